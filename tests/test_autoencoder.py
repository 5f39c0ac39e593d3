"""The autoencoder baseline: network, loss, training, evaluation, checkpoints, bundles and the command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from patchsvdd.cli.main import main
from patchsvdd.data.images import is_grayscale
from patchsvdd.data.mvtec import index_category, load_category
from patchsvdd.deploy.bundle import BundleError, read_bundle
from patchsvdd.deploy.export import export_bundle
from patchsvdd.deploy.inspector import load_bundle
from patchsvdd.evaluation.evaluate import evaluate_category
from patchsvdd.evaluation.metrics import aupro_keys, metric_keys
from patchsvdd.models.autoencoder import network as ae
from patchsvdd.models.autoencoder.training import heldout_reconstruction
from patchsvdd.models.patchsvdd.network import PatchSVDD
from patchsvdd.models.registry import build_model, describe, kind_of
from patchsvdd.settings import ExperimentSettings, SettingsError
from patchsvdd.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from patchsvdd.training.loop import make_optimizer, train_epoch


@pytest.fixture(scope="module")
def fabric(tiny_root: Path):
    return load_category(index_category(tiny_root, "fabric"))


def test_shapes_and_range() -> None:
    torch.manual_seed(0)
    for channels in (3, 1):
        model = ae.ConvAutoencoder(channels=channels, latent_dim=32, width=8)
        images = torch.rand(2, channels, 256, 256)
        with torch.no_grad():
            out = model(images)
        assert out.shape == images.shape and 0.0 <= float(out.min()) and float(out.max()) <= 1.0
        assert model.encode(images).shape == (2, 32, 1, 1)
    with pytest.raises(ValueError, match="channels=2"):
        ae.ConvAutoencoder(channels=2)
    assert kind_of(build_model("autoencoder")) == "autoencoder" and kind_of(build_model()) == "patchsvdd"
    assert describe(build_model("autoencoder")).startswith(
        "convolutional autoencoder, 3 channel(s), latent vector of 128"
    )


def test_input_conversion_and_grayscale() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)
    gray = np.repeat(rgb[..., :1], 3, axis=3)
    assert not is_grayscale(rgb) and is_grayscale(gray)
    x = ae.as_input(gray, 1)
    assert x.shape == (2, 1, 256, 256) and x.dtype == torch.float32
    assert float(x[0, 0, 5, 7]) == pytest.approx(gray[0, 5, 7, 0] / 255)
    assert ae.as_input(rgb, 3).shape == (2, 3, 256, 256)


def test_ssim_of_identical_images_is_one_and_the_loss_sees_a_difference() -> None:
    torch.manual_seed(0)
    images = torch.rand(3, 3, 256, 256)
    same = ae.reconstruction_losses(images, images)
    assert float(same["ssim"]) == pytest.approx(1.0, abs=1e-5)
    assert float(same["mse"]) == 0.0 and float(same["loss"]) == pytest.approx(0.0, abs=1e-5)
    assert torch.allclose(ae.ssim_map(images, images), torch.ones(3, 1, 256, 256), atol=1e-5)
    noisy = (images + 0.2 * torch.randn_like(images)).clamp(0, 1)
    worse = ae.reconstruction_losses(noisy, images)
    assert float(worse["ssim"]) < 0.9 and float(worse["mse"]) > 0.01
    # the maps: a defect-sized change shows up where it is, on both errors
    spoiled = images.clone()
    spoiled[:, :, 100:140, 60:100] = 0.0

    class Replay(torch.nn.Module):  # "reconstructs" the clean images, as a perfect autoencoder would
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, batch: torch.Tensor) -> torch.Tensor:
            return images[: len(batch)]

    maps = ae.error_maps(Replay(), spoiled)
    for name in ("l2", "ssim"):
        inside, outside = maps[name][:, 110:130, 70:90].mean(), maps[name][:, :, 180:].mean()
        assert maps[name].shape == (3, 256, 256) and inside > 10 * outside
    fused = ae.fuse(maps, ae.map_scales(maps))
    assert torch.allclose(
        fused["sum"],
        maps["l2"] / maps["l2"].double().mean().float() + maps["ssim"] / maps["ssim"].double().mean().float(),
        rtol=1e-4,
    )


def test_a_short_training_lowers_the_loss(fabric) -> None:
    torch.manual_seed(0)
    model = ae.ConvAutoencoder(latent_dim=32, width=8)
    images = ae.as_input(fabric.train_images, 3)
    before = heldout_reconstruction(model, images)
    optimizer = make_optimizer(model, 1e-2)
    seen: list[float] = []
    result = train_epoch(
        model,
        images,
        optimizer,
        repeat=10,
        batch_size=4,
        max_steps=20,
        generator=0,
        precision="fp32",
        on_step=lambda step, values: seen.append(values["loss"]),
    )
    after = heldout_reconstruction(model, images)
    assert result["steps"] == 20 and len(seen) == 20
    # measured: 0.771 -> 0.734 (MSE 0.038 -> 0.006; SSIM, the slow part to learn, 0.267 -> 0.272)
    assert after["heldout_rec"] < before["heldout_rec"] - 0.02
    assert after["mse"] < before["mse"] / 3 and after["ssim"] > before["ssim"]


def test_evaluate_reports_every_map_and_the_defect_table(fabric) -> None:
    torch.manual_seed(0)
    result = evaluate_category(ae.ConvAutoencoder(latent_dim=32, width=8), fabric)
    assert set(result.metrics) == set(metric_keys(ae.FUSIONS) + aupro_keys(ae.FUSIONS))
    assert all(0.0 <= v <= 1.0 for v in result.metrics.values())
    assert set(result.scores.maps) == set(ae.FUSIONS)
    assert all(m.shape == (len(fabric.test_images), 256, 256) for m in result.scores.maps.values())
    assert {"good", "crack"} <= set(result.defects["sum"]) and set(result.seconds) >= {
        "scales",
        "reconstruct",
        "metrics",
    }


def test_checkpoints_name_their_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ae.ConvAutoencoder(channels=1, latent_dim=16, width=8)
    save_checkpoint(model, tmp_path / "ae.pt", note="x")
    loaded, meta = load_checkpoint(tmp_path / "ae.pt")
    assert isinstance(loaded, ae.ConvAutoencoder) and (loaded.channels, loaded.latent_dim, loaded.width) == (1, 16, 8)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items()) and meta == {"note": "x"}
    # a checkpoint written before the autoencoder existed (no model name) is a Patch SVDD one
    old = PatchSVDD(emb_dim=8)
    torch.save({"format_version": 1, "emb_dim": 8, "state_dict": old.state_dict(), "metadata": {}}, tmp_path / "old.pt")
    assert isinstance(load_checkpoint(tmp_path / "old.pt")[0], PatchSVDD)
    payload = torch.load(tmp_path / "ae.pt", weights_only=True)
    torch.save({**payload, "model": "transformer"}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match=r"odd\.pt: model 'transformer'"):
        load_checkpoint(tmp_path / "odd.pt")


def test_bundle_scores_as_the_evaluator_does(fabric, tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = ae.ConvAutoencoder(latent_dim=32, width=8)
    inspector, calibration = export_bundle(model, fabric, tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [
        "bundle.json",
        "calibration.npz",
        "model.pt",
    ]  # no bank
    info = json.loads((tmp_path / "b" / "bundle.json").read_text())
    assert info["model"] == "autoencoder" and set(info["scales"]) == {"l2", "ssim"}
    loaded = load_bundle(tmp_path / "b")
    result = loaded.inspect(fabric.test_images[0])
    assert result.map.shape == (256, 256) and result.score == pytest.approx(float(calibration.scores[0]), rel=1e-5)
    # the same maps as the evaluator's 'sum', whose scales come from the same training images
    reference = evaluate_category(model, fabric).scores.maps["sum"][0].numpy()
    np.testing.assert_allclose(result.map, reference, rtol=1e-4)
    info["scales"] = {"l2": -1}
    (tmp_path / "b" / "bundle.json").write_text(json.dumps(info))
    with pytest.raises(BundleError, match="bundle.json: 'scales'"):
        read_bundle(tmp_path / "b")


def test_settings_name_a_model() -> None:
    assert ExperimentSettings(model="autoencoder").model == "autoencoder"
    with pytest.raises(SettingsError, match="model='svm'"):
        ExperimentSettings(model="svm")


def test_command_line_trains_evaluates_exports_and_predicts(
    tiny_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = ["--data-root", str(tiny_root), "--no-progress"]
    assert (
        main(
            [
                "train",
                "--model",
                "autoencoder",
                *data,
                "--category",
                "mesh",
                "--epochs",
                "2",
                "--batch-size",
                "2",
                "--out",
                str(tmp_path / "mesh.pt"),
            ]
        )
        == 0
    )
    mesh, meta = load_checkpoint(tmp_path / "mesh.pt")
    assert isinstance(mesh, ae.ConvAutoencoder) and mesh.channels == 1  # grayscale data: one channel
    assert (
        meta["recipe"] == "autoencoder" and len(meta["history"]) == 2 and "epoch 2/2: loss" in capsys.readouterr().out
    )
    assert (
        main(
            [
                "train",
                "--model",
                "autoencoder",
                *data,
                "--category",
                "fabric",
                "--epochs",
                "1",
                "--max-steps",
                "2",
                "--out",
                str(tmp_path / "fabric.pt"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "evaluate",
                *data,
                "--category",
                "fabric",
                "--checkpoint",
                str(tmp_path / "fabric.pt"),
                "--out-dir",
                str(tmp_path / "ev"),
                "--fusion",
                "ssim",
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert report["model"] == "autoencoder" and all(0 <= report[k] <= 1 for k in metric_keys(ae.FUSIONS))
    assert "image scores (ssim) per defect type" in capsys.readouterr().out and (tmp_path / "ev" / "roc.png").is_file()
    assert (
        main(
            [
                "evaluate",
                *data,
                "--category",
                "fabric",
                "--checkpoint",
                str(tmp_path / "fabric.pt"),
                "--out-dir",
                str(tmp_path / "ev2"),
                "--fusion",
                "64",
            ]
        )
        == 2
    )
    assert "--fusion 64: the autoencoder model's maps are l2, ssim, sum" in capsys.readouterr().err
    assert (
        main(
            [
                "export",
                *data,
                "--category",
                "fabric",
                "--checkpoint",
                str(tmp_path / "fabric.pt"),
                "--out",
                str(tmp_path / "bundle"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "predict",
                str(tmp_path / "bundle"),
                str(tiny_root / "fabric" / "test" / "crack"),
                "--out",
                str(tmp_path / "pred"),
                "--no-progress",
            ]
        )
        == 0
    )
    rows = (tmp_path / "pred" / "predictions.csv").read_text().splitlines()
    assert len(rows) == 3 and all(math.isfinite(float(row.split(",")[1])) for row in rows[1:])
