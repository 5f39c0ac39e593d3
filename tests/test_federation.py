"""Real federation on loopback: a director and two envoys started through the start scripts.

The experiments run through the same ``patchsvdd.federated`` calls the notebook
makes; the notebook itself is executed too. Every process is stopped whatever
happens (module fixture teardown).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from patchsvdd import federated as fed
from patchsvdd.cli.demo import NOTEBOOK, run_notebook
from patchsvdd.data.mvtec import index_category, load_category
from patchsvdd.deploy.bundle import read_bundle
from patchsvdd.evaluation import report
from patchsvdd.evaluation.evaluate import evaluate_category, image_scores
from patchsvdd.evaluation.metrics import split_defects
from patchsvdd.evaluation.pooling import split_sketches
from patchsvdd.federated.local import Processes, log_contains, project_root, wait_for
from patchsvdd.federated.manifest import Export, experiment_manifest
from patchsvdd.federated.openfl.engine import OpenFLEngine
from patchsvdd.federated.openfl.local import start_federation
from patchsvdd.federated.rounds import ROUND_TAG, round_of
from patchsvdd.models.autoencoder.network import ConvAutoencoder
from patchsvdd.models.patchsvdd.network import PatchSVDD
from patchsvdd.settings import SettingsError
from patchsvdd.system.probes import free_port
from patchsvdd.training.checkpoint import load_checkpoint, save_checkpoint
from patchsvdd.training.loop import make_optimizer

pytestmark = pytest.mark.slow

TINY = fed.ExperimentSettings(
    rounds=2,
    repeat=1,
    max_steps=1,
    batch_size=4,
    lr=1e-3,
    warmup_steps=0,
    idle_timeout=300,
    aggregator_port=free_port(),
)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory, fed_data: Path):
    run_dir = tmp_path_factory.mktemp("run")
    with Processes() as processes:
        nodes = start_federation(run_dir, fed_data, "fabric", n_envoys=2, processes=processes, timeout=120)
        client = fed.connect(nodes.host, nodes.port)
        yield nodes, client, run_dir
    for node in ("director", "envoy_1", "envoy_2"):
        assert (run_dir / "logs" / f"{node}.log").is_file()


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def evaluation_records(client, model, settings, name: str, workdir: Path) -> dict[str, dict[str, float]]:
    """Each node's raw final records of a one-round evaluation experiment of ``model`` (what
    ``experiment.evaluate`` turns into its tables), through the same engine adapter as the notebook."""
    engine = OpenFLEngine(client)
    manifest = experiment_manifest(model, settings, "evaluation", defect_types=engine.defect_types())
    return engine.start(model, manifest, name, workdir).follow(None, None, settings).final()


def test_registry_lists_both_shards(federation) -> None:
    _, client, _ = federation
    rows = fed.wait_for_envoys(client, 2, timeout=30)
    assert {r["envoy"] for r in rows} == {"envoy_1", "envoy_2"}
    assert all(r["sample_shape"] == ["256", "256", "3"] and r["target_shape"] == ["256", "256"] for r in rows)
    assert "4 training" in next(r for r in rows if r["envoy"] == "envoy_1")["description"]
    assert fed.shard_defect_types(client) == ["good", "crack", "hole", "scratch", "stain"]  # the union of both shards


def test_aggregated_weights_are_the_size_weighted_mean_of_the_envoys(
    federation, fed_data: Path, tmp_path: Path
) -> None:
    _, client, _ = federation
    settings = fed.ExperimentSettings(**{**TINY.__dict__, "rounds": 1})
    torch.manual_seed(1)
    model = PatchSVDD(emb_dim=16)
    initial = _state(model)
    experiment = fed.start_experiment(client, model, settings, "aggregation-check", tmp_path / "nb")
    log = fed.follow_metrics(experiment, idle_timeout=settings.idle_timeout)
    aggregated = fed.fetch_last_model(experiment)
    assert round_of(experiment.get_last_model()) == 1 and ROUND_TAG not in aggregated.state_dict()  # the round tag

    # Redo each envoy's round here: same initial weights, shard, seeded task.
    index = index_category(fed_data, "fabric")
    local_states, sizes = [], []
    for rank in (1, 2):
        shard = load_category(index.shard(rank, 2))
        local = PatchSVDD(emb_dim=16)
        local.load_state_dict(initial)
        fed.train_task(local, shard, make_optimizer(local, settings.lr), "cpu", 0, settings)
        local_states.append(_state(local))
        sizes.append(len(shard.train_images))
    assert sizes == [4, 3]
    reported = {o: m["train_loss"] for o, m in log.final("train").items() if o != "aggregator"}
    assert set(reported) == {"envoy_1", "envoy_2"}
    flat = lambda state: torch.cat([state[k].flatten().double() for k in sorted(initial)])  # noqa: E731
    got = flat(aggregated.state_dict())
    weighted = (sizes[0] * flat(local_states[0]) + sizes[1] * flat(local_states[1])) / sum(sizes)
    unweighted = (flat(local_states[0]) + flat(local_states[1])) / 2
    # Adam's first step is sign-like: a few near-zero gradients may round differently in another process.
    assert (got - weighted).abs().le(1e-6).double().mean() > 0.999
    assert (got - weighted).norm() < 0.05 * (got - unweighted).norm()
    changed = [k for k in initial if not torch.equal(initial[k], aggregated.state_dict()[k])]
    assert any(k.startswith("encoder.") for k in changed) and any(k.startswith("classifier64.") for k in changed)


def test_two_round_experiment_then_final_evaluation(federation, fed_data: Path, tmp_path: Path) -> None:
    _, client, _ = federation
    torch.manual_seed(0)
    model = PatchSVDD(emb_dim=16)
    initial = _state(model)
    experiment = fed.start_experiment(client, model, TINY, "two-rounds", tmp_path / "nb")
    saver = fed.SaveWhenImproved(experiment, tmp_path / "best.pt", category="fabric")
    log = fed.follow_metrics(experiment, idle_timeout=TINY.idle_timeout, checkpointer=saver)
    for envoy in ("envoy_1", "envoy_2"):
        assert [r for r, _ in log.series("train", "train_loss")[envoy]] == [0, 1]
        for name in fed.round_metrics(
            "patchsvdd"
        ):  # rounds 0, 1 validate what they start with; round 2 the final aggregate
            values = log.series("aggregated_model_validate", name)[envoy]
            assert [r for r, _ in values] == [0, 1, 2]
            if (
                name == fed.HELDOUT_METRICS["patchsvdd"]
            ):  # sum of both position losses on the held-out image: near 2 ln 8
                assert all(3.0 < v < 6.0 for _, v in values)
            else:
                assert all(0.0 <= v <= 1.0 for _, v in values)
    assert not log.series("locally_tuned_model_validate", "det_sum")  # skipped by our task assigner
    last = fed.fetch_last_model(experiment)
    assert any(not torch.equal(initial[k], v) for k, v in last.state_dict().items())
    saved, meta = load_checkpoint(tmp_path / "best.pt")  # chosen by the held-out loss, atomically written
    criterion = dict(log.series("aggregated_model_validate", fed.HELDOUT_METRICS["patchsvdd"])["aggregator"])
    assert meta["metric"] == fed.HELDOUT_METRICS["patchsvdd"]
    # These toy rounds are shorter than the metric stream's delay, so round r's model may be gone when it is
    # fetched: the round tag tells, and such a round is never saved under its score (SaveWhenImproved.missed).
    kept = {r: v for r, v in criterion.items() if r not in saver.missed}
    assert (
        meta["round"] == saver.best_round == saver.saved_round
        and meta["score"] == min(kept.values()) == criterion[meta["round"]]
    )
    assert ROUND_TAG not in saved.state_dict()
    if meta["round"] == 2:  # the final aggregate
        assert all(torch.equal(v, last.state_dict()[k]) for k, v in saved.state_dict().items())
    assert not list(tmp_path.glob(".best.pt.*"))
    assert (tmp_path / "nb" / "plan").is_dir()  # OpenFL's files stay in the working folder given

    # A second experiment on the same director: validation only, all metrics and per-defect statistics per envoy.
    final = evaluation_records(client, last, TINY, "two-rounds-final", tmp_path / "nb_eval")
    assert set(final) == {"envoy_1", "envoy_2", "aggregator"}
    per_node, _ = report.final_evaluation(final)
    scores, labels = [], []  # the pooled AUROC: every envoy's test images scored here as its envoy scores them
    for rank in (1, 2):
        shard = load_category(index_category(fed_data, "fabric").shard(rank, 2))
        scores.append(image_scores(evaluate_category(last, shard, mode=TINY.final_search), "sum"))
        labels.append(shard.test_labels)
    assert per_node["pooled"]["det_sum"] == pytest.approx(roc_auc_score(np.concatenate(labels), np.concatenate(scores)))
    for node, values in final.items():
        metrics, defects = split_defects(split_sketches(values)[0])
        assert set(metrics) == set(fed.final_metrics("patchsvdd"))
        assert all(0.0 <= v <= 1.0 for v in metrics.values() if not math.isnan(v))
        # the union of both envoys' types, though each shard lacks some (NaN there): one metric set for FedAvg
        assert list(defects) == ["good", "crack", "hole", "scratch", "stain"]
        if node != "aggregator":  # each envoy's own test images: counts add up to its test shard
            shard = index_category(fed_data, "fabric").shard(int(node.split("_")[1]), 2).test
            assert {name: row["n"] for name, row in defects.items()} == {
                name: sum(s.defect_type == name for s in shard) for name in defects
            }
            assert any(row["n"] == 0 and math.isnan(row["mean"]) for row in defects.values())


def test_each_site_writes_its_own_bundle_and_reports_only_numbers(federation, fed_data: Path, tmp_path: Path) -> None:
    _, client, _ = federation
    torch.manual_seed(5)
    model = PatchSVDD(emb_dim=16)
    engine = OpenFLEngine(client)
    manifest = experiment_manifest(model, TINY, "export", export=Export("site-bundles", 0.5, None))
    reported = engine.start(model, manifest, "site-bundles", tmp_path / "nb").follow(None, None, TINY).final()
    folders = fed.shard_bundle_folders(client)
    assert set(folders) == {"envoy_1", "envoy_2"} and len(set(folders.values())) == 2  # one folder per site
    banks = []
    for envoy, folder in folders.items():
        bundle = read_bundle(Path(folder) / "site-bundles")
        metrics = reported[envoy]
        assert set(metrics) == set(fed.EXPORT_METRICS) and all(isinstance(v, float) for v in metrics.values())
        assert metrics["image_threshold"] == pytest.approx(bundle.image_threshold.value)
        assert metrics["bank_rows_32"] == len(bundle.banks[32]) and bundle.info["bank_fraction"] == 0.5
        shard = load_category(index_category(fed_data, "fabric").shard(int(envoy.split("_")[1]), 2))
        assert bundle.info["n_train_in_bank"] == len(shard.train_images)  # its own images, all labelled here
        np.testing.assert_allclose(bundle.mean, shard.mean)  # the site's own mean, never another's
        banks.append(bundle.banks[64])
    assert banks[0].shape != banks[1].shape or not np.allclose(banks[0], banks[1])


def test_autoencoder_trains_through_the_same_federation(federation, fed_data: Path, tmp_path: Path) -> None:
    _, client, _ = federation
    settings = fed.ExperimentSettings(**{**TINY.__dict__, "model": "autoencoder", "model_options": {}, "rounds": 1})
    torch.manual_seed(2)
    model = ConvAutoencoder(latent_dim=16, width=8)
    initial = _state(model)
    with pytest.raises(SettingsError, match="the model sent is a patchsvdd but settings.model is 'autoencoder'"):
        fed.start_experiment(client, PatchSVDD(emb_dim=16), settings, "mismatch", tmp_path / "bad")
    experiment = fed.start_experiment(client, model, settings, "autoencoder-round", tmp_path / "nb")
    saver = fed.SaveWhenImproved(experiment, tmp_path / "best.pt", metric=fed.HELDOUT_METRICS["autoencoder"])
    log = fed.follow_metrics(experiment, idle_timeout=settings.idle_timeout, checkpointer=saver)
    for envoy in ("envoy_1", "envoy_2"):
        assert set(log.final("train")[envoy]) == set(fed.train_metrics("autoencoder"))
        for name in fed.round_metrics("autoencoder"):  # round 0 the initial model, round 1 the aggregate
            values = log.series("aggregated_model_validate", name)[envoy]
            assert [r for r, _ in values] == [0, 1] and all(0.0 <= v <= 2.0 for _, v in values)
    last = fed.fetch_last_model(experiment)
    assert isinstance(last, ConvAutoencoder)
    changed = [k for k, v in last.state_dict().items() if not torch.equal(initial[k], v)]
    assert any(k.startswith("encoder.") for k in changed) and any(k.startswith("decoder.") for k in changed)
    assert isinstance(load_checkpoint(tmp_path / "best.pt")[0], ConvAutoencoder)
    final = evaluation_records(client, last, settings, "autoencoder-final", tmp_path / "nb_eval")
    for values in final.values():
        metrics, defects = split_defects(split_sketches(values)[0])
        assert set(metrics) == set(fed.final_metrics("autoencoder")) and "good" in defects


NOTEBOOK_THAT_DIES = """
import sys, torch
from patchsvdd import federated as fed
from patchsvdd.models.autoencoder.network import ConvAutoencoder
from patchsvdd.models.patchsvdd.network import PatchSVDD
from patchsvdd.system.probes import free_port
host, port, workdir, seen = sys.argv[1:]
client = fed.connect(host, int(port))
torch.manual_seed(0)
settings = fed.ExperimentSettings(rounds=3, repeat=1, max_steps=1, batch_size=4, lr=1e-3, aggregator_port=free_port())
experiment = fed.start_experiment(client, PatchSVDD(emb_dim=16), settings, "reattach", workdir)
with open(seen, "a") as out:
    fed.follow_metrics(experiment, on_metric=lambda r: print(r["round"], r["task_name"], file=out, flush=True))
"""


def test_notebook_killed_mid_experiment_attaches_again_and_gets_the_rest(federation, tmp_path: Path) -> None:
    nodes, client, _ = federation
    seen = tmp_path / "seen.txt"
    notebook = subprocess.Popen(
        [sys.executable, "-c", NOTEBOOK_THAT_DIES, nodes.host, str(nodes.port), str(tmp_path / "nb"), str(seen)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: log_contains(seen, "0 train"), 180, "the first notebook to see a metric of round 0")
    finally:
        notebook.kill()  # the kernel dies: its metric stream closes mid-experiment
        notebook.wait(timeout=10)
    torch.manual_seed(0)
    initial = _state(PatchSVDD(emb_dim=16))
    experiment = fed.attach(client, "reattach", PatchSVDD(emb_dim=16), tmp_path / "nb")
    log = fed.follow_metrics(experiment, idle_timeout=300)
    rounds = {int(r["round"]) for r in log.records}
    assert 3 in rounds  # the final validation round: the experiment went on while no notebook listened
    assert {"envoy_1", "envoy_2"} <= set(log.final())
    last = fed.fetch_last_model(experiment)
    assert any(not torch.equal(initial[k], v) for k, v in last.state_dict().items())
    with pytest.raises(fed.FederationError, match="no experiment 'nowhere' of this client"):
        (tmp_path / "nb2").mkdir()
        (tmp_path / "nb2" / fed.EXPERIMENT_RECORD).write_text(json.dumps({"name": "nowhere", "participants": []}))
        fed.attach(client, "nowhere", PatchSVDD(emb_dim=16), tmp_path / "nb2")


def test_notebook_runs_with_tiny_parameters(federation, fed_data: Path, tmp_path: Path) -> None:
    nodes, _, _ = federation
    out = tmp_path / "results"
    torch.manual_seed(3)
    start = PatchSVDD(emb_dim=16)
    save_checkpoint(start, tmp_path / "start.pt", round=4, experiment="earlier")  # resume from a checkpoint
    aggregator_port = free_port()
    run_notebook(
        project_root() / NOTEBOOK,
        tmp_path / "executed.ipynb",
        dict(
            director_host=nodes.host,
            director_port=nodes.port,
            expected_envoys=2,
            category="fabric",
            rounds=1,
            repeat=1,
            max_steps=1,
            batch_size=4,
            model_options={"emb_dim": 16},
            final_search="fast",
            output_dir=str(out),
            local_data_root=str(fed_data),
            idle_timeout=300,
            initial_checkpoint=str(tmp_path / "start.pt"),
            aggregator_port=aggregator_port,
            proximal_mu=0.01,  # the remedies travel in the manifest and run at the envoys
            local_heads=True,
        ),
        timeout=600,
        cwd=tmp_path,
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["per_node"]) == {"envoy_1", "envoy_2", "aggregator", "pooled"}
    assert set(metrics["per_node"]["envoy_1"]) == set(
        fed.final_metrics("patchsvdd")
    )  # the sketches are not metrics to read
    assert set(metrics["per_node"]["pooled"]) == {"det_sum", "seg_sum"}
    assert set(json.loads((out / "local_metrics.json").read_text())) == set(fed.final_metrics("patchsvdd"))
    assert set(metrics["per_defect"]) == {"envoy_1", "envoy_2"}
    bundles = json.loads((out / "bundles.json").read_text())
    assert [row["envoy"] for row in bundles] == ["envoy_1", "envoy_2"]
    for row in bundles:  # written at each site, where the envoy's config says
        assert (Path(row["bundle at the site"]) / "bundle.json").is_file() and row["bundle_mb"] > 0
    for name in ("best.pt", "last.pt", "rounds.png", "gallery.png", "round_metrics.json", "learning.json"):
        assert (out / name).is_file(), name
    assert len(list((out / "maps").glob("*.png"))) == 6
    executed = (tmp_path / "executed.ipynb").read_text()
    plan = (out / "experiment" / "plan" / "plan.yaml").read_text()
    assert f"agg_port: {aggregator_port}" in plan  # the port envoys must reach, as set in the notebook
    assert "starting from" in executed and "round 4" in executed
