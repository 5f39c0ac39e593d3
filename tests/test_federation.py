"""Real federation on loopback: a director and two envoys started through the start scripts.

The experiments run through the same ``patchsvdd.federated`` calls the notebook
makes; the notebook itself is executed too. Every process is stopped whatever
happens (module fixture teardown).
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from patchsvdd import federated as fed
from patchsvdd.checkpoint import load_checkpoint, save_checkpoint
from patchsvdd.data import index_category, load_category
from patchsvdd.demo import REPO, Processes, run_notebook, start_federation
from patchsvdd.metrics import METRIC_KEYS
from patchsvdd.model import PatchSVDD
from patchsvdd.synth import generate_category
from patchsvdd.train import make_optimizer

pytestmark = pytest.mark.slow

TINY = fed.ExperimentSettings(rounds=2, repeat=1, max_steps=1, batch_size=4, lr=1e-3, idle_timeout=300)


@pytest.fixture(scope="module")
def fed_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """7 training images, so the two shards differ in size (4 and 3) and FedAvg weights matter."""
    root = tmp_path_factory.mktemp("feddata")
    generate_category(root, "fabric", seed=11, n_train=7, n_test_good=2, n_test_per_defect=1, image_size=256)
    return root


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


def test_registry_lists_both_shards(federation) -> None:
    _, client, _ = federation
    rows = fed.wait_for_envoys(client, 2, timeout=30)
    assert {r["envoy"] for r in rows} == {"envoy_1", "envoy_2"}
    assert all(r["sample_shape"] == ["256", "256", "3"] and r["target_shape"] == ["256", "256"] for r in rows)
    assert "4 training" in next(r for r in rows if r["envoy"] == "envoy_1")["description"]


def test_aggregated_weights_are_the_size_weighted_mean_of_the_envoys(federation, fed_data: Path, tmp_path: Path) -> None:
    _, client, _ = federation
    settings = fed.ExperimentSettings(**{**TINY.__dict__, "rounds": 1})
    torch.manual_seed(1)
    model = PatchSVDD(emb_dim=16)
    initial = _state(model)
    experiment = fed.start_experiment(client, model, settings, "aggregation-check", tmp_path / "nb")
    log = fed.follow_metrics(experiment, idle_timeout=settings.idle_timeout)
    _, aggregated = fed.fetch_models(experiment)

    # Redo each envoy's round here: same initial weights, shard, seeded task.
    index = index_category(fed_data, "fabric")
    local_states, sizes = [], []
    for rank in (1, 2):
        shard = load_category(index.shard(rank, 2))
        local = PatchSVDD(emb_dim=16)
        local.load_state_dict(initial)
        fed.train_task(local, shard, make_optimizer(local, settings.lr), "cpu", 0, settings.repeat, settings.batch_size,
                       settings.lambda_svdd, settings.max_steps, settings.seed)
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


def test_two_round_experiment_then_final_evaluation(federation, tmp_path: Path) -> None:
    _, client, _ = federation
    torch.manual_seed(0)
    model = PatchSVDD(emb_dim=16)
    initial = _state(model)
    experiment = fed.start_experiment(client, model, TINY, "two-rounds", tmp_path / "nb")
    saver = fed.SaveWhenImproved(experiment, tmp_path / "best.pt", category="fabric")
    log = fed.follow_metrics(experiment, idle_timeout=TINY.idle_timeout, checkpointer=saver)
    for envoy in ("envoy_1", "envoy_2"):
        assert [r for r, _ in log.series("train", "train_loss")[envoy]] == [0, 1]
        for name in fed.ROUND_METRICS:  # rounds 0, 1 validate what they start with; round 2 the final aggregate
            values = log.series("aggregated_model_validate", name)[envoy]
            assert [r for r, _ in values] == [0, 1, 2] and all(0.0 <= v <= 1.0 for _, v in values)
    assert not log.series("locally_tuned_model_validate", "det_sum")  # skipped by our task assigner
    best, last = fed.fetch_models(experiment)
    assert any(not torch.equal(initial[k], v) for k, v in last.state_dict().items())
    saved, meta = load_checkpoint(tmp_path / "best.pt")  # the best validated aggregate, atomically written
    scores = dict(log.series("aggregated_model_validate", "det_sum")["aggregator"])
    assert meta["round"] == saver.best_round and meta["score"] == max(scores.values()) == scores[meta["round"]]
    if meta["round"] == 2:
        assert all(torch.equal(v, last.state_dict()[k]) for k, v in saved.state_dict().items())
    assert not list(tmp_path.glob(".best.pt.*"))
    assert (tmp_path / "nb" / "plan").is_dir()  # OpenFL's files stay in the working folder given

    # A second experiment on the same director: validation only, all eight metrics per envoy.
    evaluation = fed.start_evaluation(client, last, TINY, "two-rounds-final", tmp_path / "nb_eval")
    final = fed.follow_metrics(evaluation, idle_timeout=TINY.idle_timeout).final()
    assert set(final) == {"envoy_1", "envoy_2", "aggregator"}
    for metrics in final.values():
        assert set(metrics) == set(METRIC_KEYS)
        assert all(0.0 <= v <= 1.0 for v in metrics.values() if not math.isnan(v))


def test_notebook_runs_with_tiny_parameters(federation, fed_data: Path, tmp_path: Path) -> None:
    nodes, _, _ = federation
    out = tmp_path / "results"
    torch.manual_seed(3)
    start = PatchSVDD(emb_dim=16)
    save_checkpoint(start, tmp_path / "start.pt", round=4, experiment="earlier")  # resume from a checkpoint
    run_notebook(
        tmp_path / "executed.ipynb",
        dict(director_host=nodes.host, director_port=nodes.port, expected_envoys=2, rounds=1, repeat=1, max_steps=1,
             batch_size=4, emb_dim=16, final_search="fast", output_dir=str(out), local_data_root=str(fed_data),
             idle_timeout=300, initial_checkpoint=str(tmp_path / "start.pt")),
        timeout=600, cwd=tmp_path,
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["per_node"]) == {"envoy_1", "envoy_2", "aggregator"}
    assert set(json.loads((out / "local_metrics.json").read_text())) == set(METRIC_KEYS)
    for name in ("best.pt", "last.pt", "best_checkpoint.pt", "rounds.png", "gallery.png", "round_metrics.json"):
        assert (out / name).is_file(), name
    assert len(list((out / "maps").glob("*.png"))) == 6
    executed = (tmp_path / "executed.ipynb").read_text()
    assert "starting from" in executed and "round 4" in executed


def test_envoy_with_bad_data_stops_before_contacting_the_director(writable_category: Path, tmp_path: Path) -> None:
    (writable_category / "fabric" / "ground_truth" / "hole" / "000_mask.png").unlink()
    config = tmp_path / "bad.yaml"
    config.write_text(
        "params: {cuda_devices: [], install_requirements: false}\n"
        "shard_descriptor:\n  template: mvtec_shard_descriptor.MVTecShardDescriptor\n"
        f"  params: {{data_folder: {writable_category}, category: fabric, rank_worldsize: '1,1'}}\n"
    )
    # Port 9 (discard) has no director: reaching it would hang or fail differently.
    result = subprocess.run(
        [str(REPO / "envoy_folder" / "start_envoy.sh"), "bad", str(config), "localhost", "9"],
        capture_output=True, text=True, timeout=120, env={"PATCHSVDD_WORKDIR": str(tmp_path / "w"), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert "hole/000.png: defect image has no mask" in result.stderr
    assert "Starting the Envoy" not in result.stdout + result.stderr


def test_malformed_config_is_one_clear_line(tmp_path: Path) -> None:
    config = tmp_path / "director.yaml"
    config.write_text("settings:\n  listen_port: [50050\n")
    result = subprocess.run(
        [str(REPO / "director_folder" / "start_director.sh"), str(config)], capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert f"{config}: malformed YAML at line" in result.stderr


def _shard_config(path: Path, data_root: Path) -> Path:
    path.write_text(
        "params: {cuda_devices: [], install_requirements: false}\n"
        "shard_descriptor:\n  template: mvtec_shard_descriptor.MVTecShardDescriptor\n"
        f"  params: {{data_folder: {data_root}, category: fabric, rank_worldsize: '1,2'}}\n"
    )
    return path


def test_wrong_director_port_stops_the_envoy_at_once(fed_data: Path, tmp_path: Path) -> None:
    from patchsvdd.demo import free_port

    result = subprocess.run(
        [str(REPO / "envoy_folder" / "start_envoy.sh"), "lost", str(_shard_config(tmp_path / "c.yaml", fed_data)),
         "localhost", str(free_port())],
        capture_output=True, text=True, timeout=60, env={"PATCHSVDD_WORKDIR": str(tmp_path / "w"), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert "cannot reach the director at localhost:" in result.stderr


def test_director_refuses_a_shard_of_other_shapes_with_a_sentence(fed_data: Path, tmp_path: Path) -> None:
    from patchsvdd.demo import DIRECTOR_READY, free_port, log_contains, wait_for, write_director_config

    port = free_port()
    config = write_director_config(tmp_path / "d" / "director_config.yaml", port)
    settings = yaml.safe_load(config.read_text())
    settings["settings"]["sample_shape"] = ["128", "128", "3"]
    config.write_text(yaml.safe_dump(settings))
    with Processes() as processes:
        director = processes.start("director", [str(REPO / "director_folder" / "start_director.sh"), str(config)],
                                   tmp_path / "director.log", env={"PATCHSVDD_WORKDIR": str(tmp_path / "d")})
        wait_for(lambda: log_contains(director.log, DIRECTOR_READY), 60, "the director", [director])
        result = subprocess.run(
            [str(REPO / "envoy_folder" / "start_envoy.sh"), "odd", str(_shard_config(tmp_path / "c.yaml", fed_data)),
             "localhost", str(port)],
            capture_output=True, text=True, timeout=120, env={"PATCHSVDD_WORKDIR": str(tmp_path / "w"), "PATH": "/usr/bin:/bin"},
        )
    assert result.returncode != 0
    assert "the director refused this shard: the shapes read from the data differ" in result.stderr
