"""Site bundles and the inspector: round trip, same maps as the evaluator, thresholds, bad bundles."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from patchsvdd.data.mvtec import index_category, load_category, standardise
from patchsvdd.deploy.bundle import BundleError, read_bundle
from patchsvdd.deploy.calibration import choose_threshold
from patchsvdd.deploy.export import export_bundle
from patchsvdd.deploy.inspector import load_bundle, to_image
from patchsvdd.evaluation.evaluate import evaluate_category
from patchsvdd.models.patchsvdd.bank import kcenter_per_position, memory_banks
from patchsvdd.models.patchsvdd.network import PatchSVDD


@pytest.fixture(scope="module")
def fabric(tiny_root: Path):
    torch.manual_seed(0)
    return PatchSVDD(emb_dim=16), load_category(index_category(tiny_root, "fabric"))


def test_bundle_round_trip_scores_as_the_evaluator_does(fabric, tmp_path: Path) -> None:
    model, data = fabric
    inspector, calibration = export_bundle(model, data, tmp_path / "b", search="exact", info={"source": "test"})
    loaded = load_bundle(tmp_path / "b", device="cpu", search="exact")
    expected = evaluate_category(model, data, mode="exact", with_aupro=False).scores.maps["sum"].numpy()
    np.testing.assert_allclose(loaded.maps(data.test_images), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(calibration.scores, expected.reshape(len(expected), -1).max(axis=1), rtol=1e-5)
    info = loaded.bundle.info
    assert info["category"] == "fabric" and info["source"] == "test" and info["image_threshold"]["method"] == "max_f1"
    assert info["bank_rows"] == {"64": 8 * 13 * 13, "32": 8 * 57 * 57}
    threshold = loaded.image_threshold.value
    result = loaded.inspect(data.test_images[0])
    assert result.map.shape == (256, 256) and result.score == pytest.approx(float(expected[0].max()), rel=1e-5)
    assert result.anomalous == (result.score >= threshold)
    assert (result.normalized_score >= 0.5) == result.anomalous
    # any size, grayscale or RGB, a path or an array: read as training reads
    big = np.asarray(Image.fromarray(data.test_images[0]).resize((400, 300)))
    assert load_bundle(tmp_path / "b", device="cpu").inspect(big).map.shape == (256, 256)
    gray = tmp_path / "gray.png"
    Image.fromarray(data.test_images[1][:, :, 0]).save(gray)
    assert to_image(gray).shape == (256, 256, 3) and np.isfinite(loaded.inspect(gray).score)
    # the bundle holds plain arrays only
    for name in ("mean.npy", "bank_64.npy", "bank_32.npy"):
        np.load(tmp_path / "b" / name, allow_pickle=False)


def _good_only(data):
    """``data`` with only its good test images: nothing defective to calibrate on."""
    good = data.test_labels == 0
    return replace(
        data,
        test_images=data.test_images[good],
        test_masks=data.test_masks[good],
        test_labels=data.test_labels[good],
        defect_types=["good"] * int(good.sum()),
        test_names=[],
    )


def test_subsampled_bank_and_no_defective_images(fabric, tmp_path: Path) -> None:
    model, data = fabric
    good_only = _good_only(data)
    inspector, calibration = export_bundle(model, data, tmp_path / "g", bank_fraction=0.25, calibration=good_only)
    info = read_bundle(tmp_path / "g").info
    assert info["image_threshold"]["method"] == "good_quantile" and "no defective image" in info["calibration_note"]
    assert info["n_train_in_bank"] == 7  # one of 8 training images held out to set the threshold
    assert info["bank_subsample"] == "kcenter" and info["bank_rows"]["32"] == round(0.25 * 7) * 57 * 57
    # never a threshold that flags every good image
    assert (calibration.scores < inspector.image_threshold.value).any() and inspector.image_threshold.fpr < 1


def test_thresholds_by_hand() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.6, 0.5, 0.9])
    best = choose_threshold(labels, scores)
    assert best.method == "max_f1" and best.value == 0.5 and best.f1 == pytest.approx(0.8)  # 2 TP, 1 FP
    strict = choose_threshold(labels, scores, max_fpr=0.0)
    assert strict.value == 0.9 and strict.fpr == 0.0 and strict.tpr == 0.5
    assert best.normalise(best.value) == 0.5 and best.normalise(0.1) == 0.0 and best.normalise(0.9) == 1.0
    good = choose_threshold(np.zeros(3), np.array([1.0, 2.0, 3.0]), good_scores=np.arange(101.0))
    assert good.method == "good_quantile" and good.value == pytest.approx(99.0)
    with pytest.raises(ValueError, match="only defective"):
        choose_threshold(np.ones(2), np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="3 scores for 2 labels"):
        choose_threshold(np.zeros(2), np.zeros(3))


def test_bad_bundles_are_named(fabric, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="bundle.json: not found"):
        read_bundle(tmp_path)
    model, data = fabric
    export_bundle(model, data, tmp_path / "b", bank_fraction=0.1)
    np.save(tmp_path / "b" / "bank_32.npy", np.array([{"code": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(BundleError, match="bank_32.npy: not a plain numpy array"):
        read_bundle(tmp_path / "b")
    (tmp_path / "b" / "bank_32.npy").unlink()
    with pytest.raises(BundleError, match="bank_32.npy: missing"):
        read_bundle(tmp_path / "b")


def test_kcenter_keeps_the_unusual_patches_and_drops_near_duplicates() -> None:
    points = torch.tensor([[0.0, 0.0], [0.0, 0.01], [10.0, 0.0], [0.0, 10.0], [0.02, 0.0]])
    grid = points[:, :, None, None]  # N=5 images, D=2, one grid position
    kept = kcenter_per_position(grid, 3)
    assert kept.shape == (3, 2)
    rows = {tuple(round(v, 2) for v in row.tolist()) for row in kept}
    assert {(10.0, 0.0), (0.0, 10.0)} <= rows and len(rows - {(10.0, 0.0), (0.0, 10.0)}) == 1  # one of the three near 0
    two_positions = torch.cat([grid, grid + 100], dim=3)  # (5,2,1,2): each position chosen on its own
    assert kcenter_per_position(two_positions, 2).shape == (4, 2)


def test_random_subsample_and_bad_settings(fabric) -> None:
    model, data = fabric
    images = standardise(data.train_images[:2], data.mean)
    banks = memory_banks(model, images, 0.1, subsample="random")
    assert len(banks[32]) == round(0.1 * 2 * 57 * 57) and len(banks[64]) == round(0.1 * 2 * 13 * 13)
    with pytest.raises(ValueError, match="subsample 'coreset'"):
        memory_banks(model, images, 0.1, subsample="coreset")
    with pytest.raises(ValueError, match="bank fraction 0"):
        memory_banks(model, images, 0)


def test_auto_bank_is_the_smallest_within_the_tolerance_of_the_full_one(fabric, tmp_path: Path) -> None:
    from patchsvdd.deploy.export import AUTO_FRACTIONS, AUTO_TOLERANCE

    model, data = fabric
    inspector, calibration = export_bundle(model, data, tmp_path / "a", bank_fraction="auto")
    table = calibration.bank_choice
    assert [row["fraction"] for row in table][0] == 1.0  # the full bank is measured first
    full, candidates = table[0], table[1:]
    assert [row["fraction"] for row in candidates] == sorted(AUTO_FRACTIONS)[: len(candidates)]

    def close(row: dict) -> bool:
        return all(row[key] >= full[key] - AUTO_TOLERANCE for key in ("det_auroc", "seg_auroc"))

    chosen = [row for row in table if row["chosen"] == "yes"]
    assert len(chosen) == 1 and inspector.bundle.info["bank_fraction"] == chosen[0]["fraction"]
    assert all(not close(row) for row in candidates[:-1])  # every smaller candidate tried was too far off
    assert close(chosen[0]) and (chosen[0] is full or chosen[0] is candidates[-1])
    assert len(inspector.bundle.banks[32]) == chosen[0]["rows_32"]
    # without defective images nothing can be measured: the full bank
    good_only = _good_only(data)
    inspector, calibration = export_bundle(model, data, tmp_path / "g", bank_fraction="auto", calibration=good_only)
    assert inspector.bundle.info["bank_fraction"] == 1.0 and calibration.bank_choice == []
