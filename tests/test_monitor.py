"""The monitor's decisions without a director: watchdog, metric log, best-model checkpointer, task assigner."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from patchsvdd import federated as fed
from patchsvdd.federated.openfl.tasks import TrainThenValidate, training_tasks
from patchsvdd.federated.rounds import ROUND_TAG, round_of, set_round, tagged, untagged
from patchsvdd.models.patchsvdd.network import PatchSVDD
from patchsvdd.training.checkpoint import load_checkpoint


def _watchdog(**kw) -> fed.Watchdog:
    return fed.Watchdog(
        name="x", participants={"a", "b"}, idle_timeout=100.0, pending_timeout=30.0, last_progress=0.0, **kw
    )


def test_watchdog_gives_up_on_an_offline_envoy_at_once() -> None:
    assert _watchdog().check(1.0, {"a", "b", "c"}, "in_progress") is None
    reason = _watchdog().check(1.0, {"a"}, "in_progress")
    assert "envoy b went offline" in reason and "initial_checkpoint" in reason


def test_watchdog_waits_offline_grace_for_an_envoy_and_says_so_once_each_way() -> None:
    said: list[str] = []
    dog = _watchdog(offline_grace=30.0, say=said.append)
    assert dog.check(10.0, {"a"}, "in_progress") is None  # b dropped at 10 s
    assert dog.check(25.0, {"a"}, "in_progress") is None
    assert said == ["experiment 'x': envoy b is offline; waiting up to 30 s for it to come back (offline_grace)"]
    assert dog.check(35.0, {"a", "b"}, "in_progress") is None  # back after 25 s
    assert said[1] == "experiment 'x': envoy b is back online after 25 s; the experiment goes on"
    assert dog.check(50.0, {"a"}, "in_progress") is None  # away again: a new grace from 50 s
    assert dog.check(79.0, {"a"}, "in_progress") is None
    reason = dog.check(80.0, {"a"}, "in_progress")
    assert "envoy b went offline during the experiment for more than 30 s" in reason and "initial_checkpoint" in reason
    assert len(said) == 3


def test_watchdog_gives_up_at_once_when_a_site_failed_or_refused_the_experiment() -> None:
    reason = _watchdog().check(1.0, {"a", "b"}, "failed")
    assert "'x' failed at a site: an envoy refused it" in reason and "[site guard]" in reason
    assert _watchdog().check(1.0, {"a", "b"}, "finished") is None


def test_watchdog_waits_pending_timeout_behind_another_experiment() -> None:
    dog = _watchdog()
    assert dog.check(10.0, {"a", "b"}, "pending") is None  # pending from 10 s
    assert dog.check(40.0, {"a", "b"}, "pending") is None  # 30 s: not more than the limit yet
    assert "waited 30 s behind another experiment" in dog.check(40.5, {"a", "b"}, "pending")
    dog = _watchdog()
    dog.check(10.0, {"a", "b"}, "pending")
    assert dog.check(20.0, {"a", "b"}, "in_progress") is None  # it started: the pending clock is reset
    assert dog.check(45.0, {"a", "b"}, "pending") is None


def test_watchdog_idle_clock_restarts_with_every_metric() -> None:
    dog = _watchdog()
    assert dog.check(99.0, {"a", "b"}, "in_progress") is None
    dog.progress(99.0)
    assert dog.check(150.0, {"a", "b"}, "in_progress") is None
    assert "no metric for 100 s" in dog.check(199.5, {"a", "b"}, "in_progress")


def _record(round_: int, origin: str, task: str, name: str, value: float) -> dict:
    return {"round": round_, "metric_origin": origin, "task_name": task, "metric_name": name, "metric_value": value}


def test_metric_log_series_and_final() -> None:
    log = fed.MetricLog(
        [
            _record(0, "aggregator", "aggregated_model_validate", "det_sum", 0.5),
            _record(0, "envoy_1", "train", "train_loss", 3.0),
            _record(1, "aggregator", "aggregated_model_validate", "det_sum", 0.7),
            _record(1, "envoy_1", "aggregated_model_validate", "det_sum", 0.6),
        ]
    )
    assert log.series("aggregated_model_validate", "det_sum") == {
        "aggregator": [(0, 0.5), (1, 0.7)],
        "envoy_1": [(1, 0.6)],
    }
    assert log.final() == {"aggregator": {"det_sum": 0.7}, "envoy_1": {"det_sum": 0.6}}
    assert log.final("train") == {"envoy_1": {"train_loss": 3.0}}


def test_checkpointer_saves_the_model_of_the_improving_round_once_a_later_round_reports(tmp_path: Path) -> None:
    """Round r's model is fetched when round r+1's first metric arrives; NaN and worse rounds never save."""
    models = {}  # what the director would hand out as "last", per round under way
    current = {"round": 0}

    def fetch() -> PatchSVDD:
        return models[current["round"]]

    for r in range(4):
        torch.manual_seed(r)
        models[r] = PatchSVDD(emb_dim=4)
    saver = fed.SaveWhenImproved(None, tmp_path / "best.pt", fetch=fetch, experiment="t")
    validation = "aggregated_model_validate"
    stream = [(0, 3.0), (1, math.nan), (2, 2.0), (3, 2.5)]
    for round_, score in stream:
        current["round"] = max(0, round_ - 1)  # when round r reports, the director still holds round r-1's model
        saver.observe(_record(round_, "envoy_1", "train", "train_loss", 1.0))
        saver.observe(_record(round_, "aggregator", validation, fed.HELDOUT_METRICS["patchsvdd"], score))
        saver.observe(_record(round_, "aggregator", validation, "det_sum", 0.9))  # another metric: ignored
        if round_ == 1:
            assert saver.saved_round == 0  # round 0's improvement, saved when round 1 reported
    saver.finish()
    assert (saver.best_round, saver.best_score, saver.saved_round) == (2, 2.0, 2)
    model, meta = load_checkpoint(tmp_path / "best.pt")
    assert (
        meta["round"] == 2
        and meta["score"] == 2.0
        and meta["metric"] == fed.HELDOUT_METRICS["patchsvdd"]
        and meta["experiment"] == "t"
    )
    expected = models[2].state_dict()  # fetched while round 3 was under way
    assert all(torch.equal(model.state_dict()[k], expected[k]) for k in expected)


def test_checkpointer_with_higher_is_better_and_nothing_to_save(tmp_path: Path) -> None:
    saver = fed.SaveWhenImproved(
        None,
        tmp_path / "b.pt",
        metric="det_sum",
        lower_is_better=False,
        fetch=lambda: pytest.fail("nothing improved: nothing to fetch"),
    )
    saver.observe(_record(0, "aggregator", "aggregated_model_validate", "det_sum", math.nan))
    saver.finish()
    assert saver.saved_round is None and not (tmp_path / "b.pt").exists()


def test_task_assigner_trains_then_validates_once_more() -> None:
    settings = fed.ExperimentSettings(rounds=2, aggregator_port=None)
    assigner = TrainThenValidate(training_tasks(settings), settings.rounds)
    names = [[task.name for task in assigner.tasks_of_round(r)] for r in range(3)]
    assert names == [["train", "aggregated_model_validate"]] * 2 + [["aggregated_model_validate"]]
    assert set(assigner(["envoy_1", "envoy_2"], 0)) == {"envoy_1", "envoy_2"}


def test_round_tag_travels_with_a_copy_and_survives_fedavg() -> None:
    torch.manual_seed(0)
    model = PatchSVDD(emb_dim=4)
    sent = tagged(model)
    assert round_of(model) is None and ROUND_TAG not in model.state_dict()  # the caller's model is untouched
    assert round_of(sent) == 0 and ROUND_TAG in sent.state_dict()
    set_round(sent, 3)
    weights = torch.tensor([4.0, 3.0]) / 7  # FedAvg of two envoys' equal tags, weighted by shard size
    averaged = (weights[0] * sent.state_dict()[ROUND_TAG] + weights[1] * sent.state_dict()[ROUND_TAG]).item()
    sent.state_dict()[ROUND_TAG].fill_(averaged)
    assert round_of(sent) == 3
    plain = untagged(sent)
    assert round_of(plain) is None and set(plain.state_dict()) == set(model.state_dict())
    set_round(plain, 5)  # no tag: left alone
    assert round_of(plain) is None


def test_checkpointer_never_saves_a_later_model_under_an_earlier_score(tmp_path: Path) -> None:
    """Round 1's improvement is fetched after the director already holds round 2's model (a round shorter
    than the stream's delay): the tag shows it, nothing is written for round 1, and a later model that
    beats the one saved is still saved."""
    tagged_models = {}
    for r in range(4):
        torch.manual_seed(r)
        tagged_models[r] = tagged(PatchSVDD(emb_dim=4))
        set_round(tagged_models[r], r)
    held = {"round": 0}
    saver = fed.SaveWhenImproved(None, tmp_path / "best.pt", fetch=lambda: tagged_models[held["round"]])
    validation = "aggregated_model_validate"
    saver.observe(_record(0, "aggregator", validation, fed.HELDOUT_METRICS["patchsvdd"], 3.0))
    saver.observe(_record(1, "aggregator", validation, fed.HELDOUT_METRICS["patchsvdd"], 2.0))  # saves round 0
    assert saver.saved_round == 0
    held["round"] = 2  # round 2 ended before its metrics were read
    with pytest.warns(RuntimeWarning, match="round 1 .* replaced on the director by round 2's"):
        saver.observe(_record(3, "aggregator", validation, fed.HELDOUT_METRICS["patchsvdd"], 2.5))
    assert saver.missed == [1] and saver.saved_round == 0
    assert load_checkpoint(tmp_path / "best.pt")[1]["round"] == 0
    held["round"] = 3
    saver.finish()  # round 3's 2.5 beats the saved 3.0 (not the missed 2.0): saved
    model, meta = load_checkpoint(tmp_path / "best.pt")
    assert (meta["round"], meta["score"], saver.best_round) == (3, 2.5, 3)
    assert ROUND_TAG not in model.state_dict()
    expected = untagged(tagged_models[3]).state_dict()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())


def _metric(round_number: int, origin: str, name: str, value: float, task: str = "aggregated_model_validate") -> dict:
    return {
        "round": round_number,
        "metric_origin": origin,
        "task_name": task,
        "metric_name": name,
        "metric_value": value,
    }


def test_round_lines_write_one_line_per_round_once_the_aggregates_are_in() -> None:
    lines: list[str] = []
    now = [100.0]
    show = fed.RoundLines(("heldout_pos", "det_sum"), rounds=3, write=lines.append, clock=lambda: now[0])
    now[0] = 130.0
    for origin, value in (("envoy_1", 0.6), ("envoy_2", 0.7)):
        show(_metric(0, origin, "heldout_pos", 4.0 + value))
        show(_metric(0, origin, "det_sum", value))
        show(_metric(0, origin, "loss", 9.0, task="train"))  # training metrics are not the line's
    show(_metric(0, "aggregator", "heldout_pos", 4.65))
    assert lines == []  # det_sum's aggregate has not come yet
    show(_metric(0, "aggregator", "det_sum", 0.65))
    assert lines == [
        "round 0/3    30 s  heldout_pos 4.650 (envoy_1 4.600, envoy_2 4.700)  "
        "det_sum 0.650 (envoy_1 0.600, envoy_2 0.700)"
    ]
    show(_metric(0, "aggregator", "det_sum", 0.65))  # a repeated value does not write the round again
    now[0] = 171.0
    show(_metric(1, "aggregator", "heldout_pos", 3.0))
    show(_metric(1, "aggregator", "det_sum", 0.8))
    assert len(lines) == 2 and lines[1].startswith("round 1/3    41 s  heldout_pos 3.000 ()")
