"""The Flower adapter's pieces without processes: the app's identity, the records a site reads, FedAvg."""

from __future__ import annotations

import hashlib
import inspect
import io
import shutil
import ssl
import subprocess
import sys
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from patchsvdd.federated.flower import app, records
from patchsvdd.federated.flower.driver import fedavg, weighted
from patchsvdd.federated.manifest import experiment_manifest
from patchsvdd.federated.names import ExperimentRefused
from patchsvdd.federated.rounds import tagged
from patchsvdd.models.registry import build_model
from patchsvdd.settings import ExperimentSettings


def test_the_app_is_what_flwr_builds_from_its_folder(tmp_path: Path) -> None:
    """A site's hash of its own code is the hash the SuperLink gives a run submitted from the same code."""
    folder = app.write_app(tmp_path / "app")
    flwr = Path(sys.executable).with_name("flwr")
    subprocess.run([str(flwr), "build", "--app", str(folder)], cwd=tmp_path, check=True, capture_output=True)
    (built,) = tmp_path.glob("*.fab")
    assert hashlib.sha256(built.read_bytes()).hexdigest() == app.app_hash()
    assert app.build_app() == app.build_app()  # deterministic: every site gets the same bytes
    assert set(zipfile.ZipFile(io.BytesIO(app.build_app())).namelist()) >= {"pyproject.toml"}


def test_a_changed_line_anywhere_in_the_package_is_another_app(tmp_path: Path) -> None:
    copy = tmp_path / "patchsvdd"
    shutil.copytree(app.package_folder(), copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert app.code_digest(copy) == app.code_digest()
    target = copy / "models" / "patchsvdd" / "scoring.py"
    target.write_text(target.read_text() + "\n# one more line\n")
    assert app.app_hash(app.code_digest(copy)) != app.app_hash()


def _task(settings: ExperimentSettings | None = None) -> tuple[RecordDict, torch.nn.Module]:
    model = build_model("patchsvdd", emb_dim=8)
    manifest = experiment_manifest(model, settings or ExperimentSettings(rounds=1), "training")
    content = RecordDict(
        {
            records.TASK: records.task_record(manifest, "exp-1", 0),
            records.ARRAYS: records.weights_record(tagged(model).state_dict()),
        }
    )
    return content, model


def test_a_task_record_reads_back_as_sent() -> None:
    content, model = _task()
    manifest, name, number = records.read_task(content)
    assert (name, number, manifest.model, manifest.architecture) == ("exp-1", 0, "patchsvdd", {"emb_dim": 8})
    weights = records.record_weights(content)
    for key, value in tagged(model).state_dict().items():
        assert np.array_equal(weights[key], value.numpy()) and weights[key].dtype == np.float32


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"experiment": "../../etc"}, "the experiment's name"),
        ({"round": -1}, "whole number"),
        ({"round": True}, "whole number"),
        ({"manifest": "{" * 70_000}, "at most"),
        ({"manifest": '{"format": "patchsvdd-experiment/1"}'}, "its manifest has the keys"),
        ({"extra": "x"}, "not manifest, experiment, round"),
    ],
)
def test_a_hostile_task_record_is_refused_with_a_sentence(change: dict, message: str) -> None:
    content, _ = _task()
    values = {**dict(content.config_records[records.TASK]), **change}
    content[records.TASK] = ConfigRecord(values)
    with pytest.raises((ExperimentRefused, records.RecordError), match=message):
        records.read_task(content)


def test_weights_that_are_not_numpy_arrays_are_refused() -> None:
    content, _ = _task()
    content[records.ARRAYS] = ArrayRecord(torch_state_dict={"w": torch.zeros(2)})
    assert set(records.record_weights(content)) == {"w"}  # readable; check_weights then compares keys and shapes
    del content.array_records[records.ARRAYS]
    with pytest.raises(records.RecordError, match="no weights"):
        records.record_weights(content)


def test_fedavg_weights_the_sites_by_their_training_images() -> None:
    a = {"w": np.array([0.0, 3.0], dtype=np.float32)}
    b = {"w": np.array([4.0, 0.0], dtype=np.float32)}
    averaged = fedavg([a, b], [3, 1])
    assert averaged["w"].dtype == np.float32
    assert np.allclose(averaged["w"], [1.0, 2.25])
    assert weighted([(1.0, 3), (float("nan"), 5), (3.0, 1)]) == pytest.approx(1.5)


def test_the_settings_of_a_manifest_are_checked_at_the_site() -> None:
    content, _ = _task(replace(ExperimentSettings(), rounds=1))
    record = dict(content.config_records[records.TASK])
    record["manifest"] = record["manifest"].replace('"max_steps": 40', '"max_steps": 100000000')
    content[records.TASK] = ConfigRecord(record)
    with pytest.raises(ExperimentRefused, match="max_steps"):
        records.read_task(content)


def test_the_supernodes_waits_are_where_the_cut_expects_them_and_capped() -> None:
    """An upgrade of Flower that moves the SuperNode's waits fails here, not silently in a slower round."""
    import time

    from patchsvdd.federated.flower import supernode

    assert supernode.wait_module().time is time
    clock = supernode.capped_clock(0.01)
    start = time.monotonic()
    clock.sleep(3)
    assert time.monotonic() - start < 1 and clock.monotonic is time.monotonic


def test_the_places_mutual_tls_patches_are_where_it_expects_them(tmp_path: Path) -> None:
    """uvicorn's run, gRPC's server credentials and Flower's HTTP client: a Flower release that moves one
    fails here, not in a federation."""
    from patchsvdd.federated.flower import mtls
    from patchsvdd.system.certs import create_federation_certs

    uvicorn, grpc, client = mtls.patch_points()
    assert "ssl_cert_reqs" in inspect.signature(uvicorn.Config).parameters
    assert "require_client_auth" in inspect.signature(grpc.ssl_server_credentials).parameters
    assert "verify" in inspect.signature(client.__init__).parameters
    certs = create_federation_certs(tmp_path / "pki", ["localhost"], ["site_1"])
    context = mtls.client_context(str(certs / "root_ca.crt"), certs / "site_1.crt", certs / "site_1.key")
    assert context.verify_mode == ssl.CERT_REQUIRED
    with pytest.raises(FileNotFoundError):
        mtls.client_context(True, certs / "site_9.crt", certs / "site_9.key")
