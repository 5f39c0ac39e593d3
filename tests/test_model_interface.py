"""One model interface: a third model (tests/toy_model, one folder) registered with one line goes through the
shared trainer, checkpoints, evaluator, bundle export, inspector, federated tasks and the site guard's model
check, none of which is told which model it holds."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from patchsvdd.data.mvtec import index_category, load_category
from patchsvdd.deploy.bundle import read_bundle
from patchsvdd.deploy.export import export_bundle
from patchsvdd.deploy.inspector import load_bundle
from patchsvdd.evaluation.evaluate import evaluate_category
from patchsvdd.federated import site_model
from patchsvdd.federated.manifest import parse_manifest
from patchsvdd.federated.openfl import client
from patchsvdd.federated.progress import round_metrics
from patchsvdd.federated.rounds import tagged
from patchsvdd.federated.site_tasks import SiteData, export_task, train_task, validate_task
from patchsvdd.models import registry
from patchsvdd.models.registry import ModelEntry, build_model, describe, kind_of
from patchsvdd.settings import ExperimentSettings, SettingsError
from patchsvdd.training.checkpoint import load_checkpoint, save_checkpoint
from patchsvdd.training.loop import make_optimizer, train_epoch


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch):
    """The one registry line a new model adds."""
    monkeypatch.setitem(registry.REGISTRY, "toy", ModelEntry("toy", "toy_model.family:ToyFamily", "heldout_mse", "cpu"))
    return registry.family("toy")


@pytest.fixture(scope="module")
def fabric(tiny_root: Path):
    return load_category(index_category(tiny_root, "fabric"))


def test_a_registered_model_trains_evaluates_exports_and_inspects(toy, fabric, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("toy")
    assert kind_of(model) == "toy" and describe(model).startswith("toy colour predictor")
    inputs = toy.inputs(model, fabric.train_images, fabric.mean)
    before = toy.heldout(model, inputs)
    losses = train_epoch(
        model, inputs, make_optimizer(model, 1e-2), repeat=20, batch_size=4, max_steps=40, generator=0, precision="fp32"
    )
    assert losses["steps"] == 40 and toy.heldout(model, inputs) < before

    save_checkpoint(model, tmp_path / "toy.pt", category="fabric")
    loaded, meta = load_checkpoint(tmp_path / "toy.pt")
    assert kind_of(loaded) == "toy" and meta["category"] == "fabric"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))

    result = evaluate_category(loaded, fabric)
    assert set(result.scores.maps) == {"sum"} and 0.0 <= result.metrics["det_sum"] <= 1.0

    inspector, calibration = export_bundle(loaded, fabric, tmp_path / "bundle")
    assert read_bundle(tmp_path / "bundle").kind == "toy" and inspector.search == "none"
    again = load_bundle(tmp_path / "bundle", device="cpu")
    answer = again.inspect(fabric.test_images[0])
    np.testing.assert_allclose(answer.map, inspector.maps(fabric.test_images[:1])[0], rtol=1e-5)
    assert answer.anomalous == (answer.score >= again.image_threshold.value) and len(calibration.scores) == len(
        fabric.test_images
    )


def test_a_registered_model_runs_the_federated_tasks_and_passes_the_guard(toy, fabric, tmp_path: Path) -> None:
    settings = ExperimentSettings(model="toy", rounds=2, max_steps=3, batch_size=4, precision="fp32")
    site = SiteData(**asdict(fabric), bundle_folder=str(tmp_path))
    torch.manual_seed(0)
    model = build_model("toy")
    assert set(train_task(model, site, make_optimizer(model), "cpu", 0, settings)) == set(toy.train_metrics)
    metrics = validate_task(model, site, "cpu", "exact", round_metrics("toy"), settings.holdout_fraction)
    assert set(metrics) == {"heldout_mse", "det_sum", "seg_sum"} and metrics["heldout_mse"] > 0
    exported = export_task(model, site, "cpu", "toy-run", 1.0, None)
    assert exported["bank_rows_32"] == 0 and read_bundle(tmp_path / "toy-run").kind == "toy"
    # a site builds it from a manifest, and accepts its weights: they fit the architecture it names
    manifest = client.experiment_manifest(model, settings, "training")
    expected = site_model.expected_weights(parse_manifest(manifest.to_json()))
    site_model.check_weights(expected, {k: v.numpy() for k, v in tagged(model).state_dict().items()}, "its model")


def test_an_unregistered_model_is_named_as_such() -> None:
    with pytest.raises(SettingsError, match="model='toy': choose patchsvdd, autoencoder"):
        ExperimentSettings(model="toy")
    with pytest.raises(TypeError, match="not the network of any registered model"):
        kind_of(torch.nn.Linear(2, 2))
