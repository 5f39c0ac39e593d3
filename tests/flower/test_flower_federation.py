"""The federation on Flower with real processes: a SuperLink with TLS and SuperNode authentication, two sites
started through the start scripts, and the data scientist's side in this process.

A hostile app is refused by every site and reads nothing; hostile data with the project's app are refused
with a sentence; a key the director did not register is refused; the project's experiment then trains,
evaluates and exports through the same sites, and its first aggregate is the size-weighted mean of what each
site's own training task gives; through secure aggregation, that mean to its quantisation, and a site refuses
to send weights in the clear when the experiment asks for secure aggregation, or to weaken it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from patchsvdd import experiment
from patchsvdd.data.mvtec import index_category, load_category
from patchsvdd.federated.flower import mtls, records, secagg
from patchsvdd.federated.flower.driver import FederationError, FlowerEngine, fedavg, submit_app
from patchsvdd.federated.flower.local import start_flower_federation, start_site
from patchsvdd.federated.local import Processes, log_contains, project_root, wait_for
from patchsvdd.federated.manifest import experiment_manifest
from patchsvdd.federated.site_tasks import train_task
from patchsvdd.models.registry import build_model
from patchsvdd.settings import ExperimentSettings
from patchsvdd.system.certs import create_federation_certs, issue_certificate, write_node_auth_key
from patchsvdd.training.loop import make_optimizer

pytestmark = pytest.mark.slow

HOSTILE_APP = Path(__file__).parent / "hostile_app"
TINY = ExperimentSettings(
    rounds=2,
    repeat=1,
    max_steps=1,
    batch_size=4,
    warmup_steps=0,
    idle_timeout=300,
    model_options={"emb_dim": 16},
    final_search="fast",
)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory, fed_data: Path):
    run_dir = tmp_path_factory.mktemp("flower")
    with Processes() as processes:
        local = start_flower_federation(run_dir, fed_data, "fabric", 2, processes=processes, tls=True)
        yield local, run_dir


def _stolen(run_dir: Path) -> list[Path]:
    return sorted(run_dir.rglob("STOLEN"))


def test_every_site_refuses_another_app_and_nothing_is_read(federation, tmp_path: Path) -> None:
    local, run_dir = federation
    hostile = FlowerEngine.take(local.superlink, submit_app(local.superlink, tmp_path, app=HOSTILE_APP))
    try:
        nodes = sorted(hostile.grid.get_node_ids())
        assert len(nodes) == 2
        ask = RecordDict({"loot": ConfigRecord({"please": 1})})
        with pytest.raises(FederationError, match="refused by site site_[12]: it runs only this project's app"):
            hostile.exchange({n: hostile.message(n, ask, "train") for n in nodes}, timeout=60)
    finally:
        hostile.close(failed="refused")
    for name in local.sites:  # the first refusal ends the exchange; each site says so in its log
        wait_for(partial(log_contains, run_dir / "logs" / f"{name}.log", "refused by site"), 60, f"{name}'s refusal")
    assert _stolen(run_dir) == []


def test_hostile_data_in_the_projects_app_are_refused_and_the_site_keeps_serving(federation, tmp_path: Path) -> None:
    local, _ = federation
    engine = FlowerEngine.connect(local.superlink, tmp_path)
    try:
        rows = engine.sites(2)
        assert [r["envoy"] for r in rows] == ["site_1", "site_2"]
        model = build_model("patchsvdd", emb_dim=16)
        manifest = experiment_manifest(model, TINY, "training")
        run = engine.start(model, manifest, "fine", tmp_path)
        node = next(n for n, name in engine.names.items() if name == "site_1")
        bad_name = RecordDict(
            {
                records.TASK: ConfigRecord({"manifest": manifest.to_json().decode(), "experiment": "../x", "round": 0}),
                records.ARRAYS: records.weights_record(run.model.state_dict()),
            }
        )
        with pytest.raises(FederationError, match="site_1: ExperimentRefused: the experiment's name"):
            engine.exchange({node: engine.message(node, bad_name, "train")}, timeout=60)
        wrong_shape = dict(run.model.state_dict())
        wrong_shape["encoder.conv1.weight"] = torch.zeros(3)
        bad_weights = RecordDict(
            {
                records.TASK: records.task_record(manifest, "fine", 0),
                records.ARRAYS: records.weights_record(wrong_shape),
            }
        )
        with pytest.raises(FederationError, match="not float32 of shape|not this model's"):
            engine.exchange({node: engine.message(node, bad_weights, "train")}, timeout=60)
        assert engine.sites(2)  # both sites still answer
    finally:
        engine.close()


def test_a_key_the_director_did_not_register_is_refused_with_a_sentence(federation) -> None:
    local, run_dir = federation
    certs = run_dir / "certs"
    write_node_auth_key(certs, "intruder")  # a key of the right kind, made after the SuperLink registered the sites'
    # and a certificate of the federation's authority: mutual TLS lets it in, the key check does not
    issue_certificate(certs, "intruder", "intruder", [], certs / "root_ca.key", certs / "root_ca.crt")
    port = int(local.superlink.address.rsplit(":", 1)[1])
    os.environ["PATCHSVDD_LINK_TIMEOUT"] = "15"
    try:
        with Processes() as processes:
            node = start_site(processes, project_root(), run_dir, "intruder", local.configs["site_1"], port, certs, "1")
            assert node.process.wait(timeout=120) == 3
    finally:
        del os.environ["PATCHSVDD_LINK_TIMEOUT"]
    assert "did not admit this site: its key intruder.auth.pub is not registered" in node.log.read_text()


def test_only_certificates_of_the_federations_authority_reach_the_superlink(federation, tmp_path: Path) -> None:
    """Mutual TLS on the SuperLink's one port (Fleet, Control, Runtime): a client without a certificate, or
    with one of another authority, gets no answer; a site with one is refused with a sentence; the data
    scientist's side without one cannot submit a run."""
    local, run_dir = federation
    certs = run_dir / "certs"
    other = create_federation_certs(tmp_path / "other", ["localhost"], ["site_1"])
    ca, address = certs / "root_ca.crt", local.superlink.address
    assert mtls.answers(address, ca, certs / "frontend.crt", certs / "frontend.key")
    assert not mtls.answers(address, ca, other / "frontend.crt", other / "frontend.key")
    assert not mtls.answers(address, ca, other / "site_1.crt", other / "site_1.key")
    unnamed = replace(local.superlink, client_certificate=None)
    with pytest.raises(FederationError, match="flwr run did not start a run"):
        submit_app(unnamed, tmp_path / "unnamed")
    foreign = tmp_path / "foreign"  # a site's folder whose certificate another authority issued
    shutil.copytree(certs, foreign)
    write_node_auth_key(foreign, "stranger")
    for suffix in ("crt", "key"):
        shutil.copy(other / f"site_1.{suffix}", foreign / f"stranger.{suffix}")
    port = int(address.rsplit(":", 1)[1])
    os.environ["PATCHSVDD_LINK_TIMEOUT"] = "15"
    try:
        with Processes() as processes:
            node = start_site(
                processes, project_root(), run_dir, "stranger", local.configs["site_1"], port, foreign, "1"
            )
            assert node.process.wait(timeout=120) == 4
    finally:
        del os.environ["PATCHSVDD_LINK_TIMEOUT"]
    assert "refused this site's certificate stranger.crt: it takes only certificates of the" in node.log.read_text()


def test_train_evaluate_export_on_flower(federation, tmp_path: Path) -> None:
    local, _ = federation
    engine = FlowerEngine.connect(local.superlink, tmp_path / "engine")
    try:
        engine.sites(2)
        assert engine.defect_types() == ["good", "crack", "hole", "scratch", "stain"]
        torch.manual_seed(1)
        model = build_model("patchsvdd", emb_dim=16)
        trained = experiment.train(engine, model, TINY, "tiny", tmp_path / "out", category="fabric")
        evaluation = experiment.evaluate(engine, trained.final_model, TINY, "tiny", tmp_path / "out")
        bundles = experiment.export(engine, trained.final_model, TINY, "tiny", tmp_path / "out")
    finally:
        engine.close()
    out = tmp_path / "out"
    for name in ("best.pt", "last.pt", "round_metrics.json", "learning.json", "metrics.json", "bundles.json"):
        assert (out / name).is_file(), name
    rounds = {(r["round"], r["metric_origin"]) for r in json.loads((out / "round_metrics.json").read_text())}
    assert {(n, o) for n in (0, 1, 2) for o in ("site_1", "site_2", "aggregator")} <= rounds
    assert set(trained.log.final("train")) == {"site_1", "site_2", "aggregator"}
    assert set(evaluation.per_node) >= {"site_1", "site_2", "aggregator", "pooled"}
    assert {row["envoy"] for row in bundles} == {"site_1", "site_2"}
    for row in bundles:
        assert (Path(row["bundle at the site"]) / "bundle.json").is_file()


def _first_aggregate(local, tmp_path: Path, settings: ExperimentSettings, initial: dict) -> dict:
    """The aggregate of one training round of the experiment from ``initial``, through the engine."""
    model = build_model("patchsvdd", emb_dim=16)
    model.load_state_dict(initial)
    engine = FlowerEngine.connect(local.superlink, tmp_path / "engine")
    try:
        engine.sites(2)
        trained = experiment.train(engine, model, settings, "mean", tmp_path / "out", category="fabric")
    finally:
        engine.close()
    return trained.last_model.state_dict()


def _fedavg_redone_here(fed_data: Path, settings: ExperimentSettings, initial: dict) -> dict:
    """Each site's training task redone here from ``initial`` on its shard (4 and 3 images), on one thread as
    the sites train, and their FedAvg."""
    index = index_category(fed_data, "fabric")
    states, sizes = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the sites' OMP_NUM_THREADS (two sites on this machine's cores)
    try:
        for rank in (1, 2):
            shard = load_category(index.shard(rank, 2))
            site = build_model("patchsvdd", emb_dim=16)
            site.load_state_dict(initial)
            train_task(site, shard, make_optimizer(site, settings.lr), "cpu", 0, settings)
            states.append({k: v.detach().numpy().copy() for k, v in site.state_dict().items()})
            sizes.append(len(shard.train_images))
    finally:
        torch.set_num_threads(threads)
    assert sizes == [4, 3]
    return fedavg(states, sizes)


def _initial() -> dict:
    torch.manual_seed(1)
    return {k: v.clone() for k, v in build_model("patchsvdd", emb_dim=16).state_dict().items()}


def test_the_first_aggregate_is_the_size_weighted_mean_of_the_sites(federation, fed_data: Path, tmp_path: Path) -> None:
    """FedAvg of each site's training task redone here is the engine's aggregate, bit for bit."""
    local, _ = federation
    settings = ExperimentSettings(**{**TINY.__dict__, "rounds": 1})
    initial = _initial()
    got = _first_aggregate(local, tmp_path, settings, initial)
    expected = _fedavg_redone_here(fed_data, settings, initial)
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], torch.from_numpy(expected[k])) for k in expected)
    assert not all(torch.equal(got[k], initial[k]) for k in initial)  # it trained


def test_secure_aggregation_gives_fedavg_to_its_quantisation(federation, fed_data: Path, tmp_path: Path) -> None:
    """The same round through SecAgg+ (each site's weights masked; the driver unmasks only their sum): FedAvg
    of the sites' tasks redone here, to SecAgg+'s quantisation step (2C/Q per site, over the sum of the
    scales 4/4 + 3/4) and float32's rounding of the result."""
    local, _ = federation
    settings = ExperimentSettings(**{**TINY.__dict__, "rounds": 1, "secure_aggregation": True})
    initial = _initial()
    got = _first_aggregate(local, tmp_path, settings, initial)
    expected = _fedavg_redone_here(fed_data, settings, initial)
    bound = 2 * (2 * secagg.CLIPPING_RANGE / secagg.quantization_range(2)) / (1 + 3 / 4)
    for key, value in expected.items():
        error = np.abs(got[key].numpy().astype(np.float64) - value)
        assert np.all(error <= bound + np.abs(value) * np.finfo(np.float32).eps), key
    assert not all(torch.equal(got[k], torch.from_numpy(expected[k])) for k in expected)  # rounded, not sent


def test_a_site_refuses_to_send_weights_in_the_clear_or_to_weaken_secagg(federation, tmp_path: Path) -> None:
    local, _ = federation
    engine = FlowerEngine.connect(local.superlink, tmp_path)
    try:
        engine.sites(2)
        model = build_model("patchsvdd", emb_dim=16)
        settings = ExperimentSettings(**{**TINY.__dict__, "secure_aggregation": True})
        run = engine.start(model, experiment_manifest(model, settings, "training"), "masked", tmp_path)
        node = next(n for n, name in engine.names.items() if name == "site_2")
        plain = RecordDict(
            {
                records.TASK: records.task_record(run.manifest, "masked", 0),
                records.ARRAYS: records.weights_record(run.model.state_dict()),
            }
        )
        with pytest.raises(FederationError, match="site_2: ExperimentRefused: site site_2 sends trained weights only"):
            engine.exchange({node: engine.message(node, plain, "train")}, timeout=60)
        setup = {
            Key.STAGE: Stage.SETUP,
            Key.SAMPLE_NUMBER: 2,
            Key.SHARE_NUMBER: 2,
            Key.THRESHOLD: 1,  # one share would rebuild a site's secrets: the driver could unmask its weights
            Key.CLIPPING_RANGE: 8.0,
            Key.TARGET_RANGE: 2**30,
            Key.MOD_RANGE: 2**32,
            Key.MAX_WEIGHT: 4.0,
        }
        weak = RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(setup)})
        with pytest.raises(FederationError, match="site_2: RecordError: SecAgg\\+ threshold is 1"):
            engine.exchange({node: engine.message(node, weak, "train")}, timeout=60)
        assert engine.sites(2)  # both sites still answer
    finally:
        engine.close()
