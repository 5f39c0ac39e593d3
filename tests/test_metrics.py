"""AUROC on hand-checked cases and the single-class case."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from patchsvdd.evaluation.metrics import (
    AUPRO_KEYS,
    METRIC_KEYS,
    SingleClassWarning,
    aupro,
    auroc,
    auroc_standard_error,
    category_metrics,
    flatten_defects,
    per_defect,
    split_defects,
)


def test_auroc_hand_checked() -> None:
    assert auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert auroc(np.array([0, 0, 1, 1]), np.array([0.4, 0.3, 0.2, 0.1])) == 0.0
    # Pairs (pos, neg): (0.35>0.1) (0.35>0.4 no) (0.8>0.1) (0.8>0.4) -> 3 of 4.
    assert auroc(np.array([0, 1, 0, 1]), np.array([0.1, 0.35, 0.4, 0.8])) == 0.75
    assert auroc(np.array([0, 1]), np.array([0.5, 0.5])) == 0.5  # ties count half


@pytest.mark.parametrize("value", [0.65, 0.86, 0.98])
def test_auroc_standard_error_matches_the_spread_of_simulated_test_sets(value: float) -> None:
    # Exponential scores: good ~ Exp(1), defective ~ Exp(rate mu) give AUROC 1 / (1 + mu), the model under which
    # Hanley and McNeil's variance is exact. 4000 test sets of the demo's size (20 good, 40 defective per envoy).
    rng = np.random.default_rng(0)
    n_normal, n_anomalous, draws = 20, 40, 4000
    good = rng.exponential(1.0, (draws, n_normal))
    defective = rng.exponential(value / (1 - value), (draws, n_anomalous))
    simulated = (defective[:, :, None] > good[:, None, :]).mean(axis=(1, 2))
    expected = auroc_standard_error(value, n_normal, n_anomalous)
    assert abs(simulated.mean() - value) < 0.01
    assert simulated.std() == pytest.approx(expected, rel=0.08)


def test_auroc_standard_error_refuses_a_single_class() -> None:
    with pytest.raises(ValueError, match="0 good"):
        auroc_standard_error(0.9, 0, 40)


def test_single_class_gives_none_and_a_warning() -> None:
    with pytest.warns(SingleClassWarning, match="only label"):
        assert auroc(np.zeros(5), np.arange(5)) is None


def test_category_metrics_detection_and_segmentation() -> None:
    maps = torch.zeros(3, 4, 4)
    maps[1, 0, 0] = 2.0  # defective image, hottest pixel on its defect
    maps[2, 3, 3] = 1.0  # good image with a warm pixel
    masks = np.zeros((3, 4, 4), dtype=np.uint8)
    masks[1, 0, 0] = 1
    labels = np.array([0, 1, 0])
    result = category_metrics({"64": maps, "32": maps, "sum": maps, "mult": maps}, labels, masks)
    assert sorted(result) == sorted(METRIC_KEYS + AUPRO_KEYS)
    assert result["det_64"] == 1.0
    assert result["seg_64"] == 1.0
    maps[1, 0, 0] = 0.5  # now below the good image's warm pixel
    result = category_metrics({"64": maps}, labels, masks, with_aupro=False)
    assert set(result) == {"det_64", "seg_64"}
    assert result["det_64"] == 0.5 and result["seg_64"] == pytest.approx(46 / 47)
    with pytest.warns(SingleClassWarning):
        none = category_metrics({"64": maps}, np.zeros(3), np.zeros((3, 4, 4)))
    assert none == {"det_64": None, "seg_64": None, "aupro_64": None}


def _components(mask: np.ndarray) -> list[set[tuple[int, int]]]:
    """8-connected regions of a small 2-D 0/1 mask by flood fill (the reference's own, not scipy's)."""
    seen: set[tuple[int, int]] = set()
    regions = []
    for start in zip(*np.nonzero(mask)):
        if start in seen:
            continue
        region, todo = set(), [start]
        while todo:
            y, x = todo.pop()
            if (y, x) in seen or not (0 <= y < mask.shape[0] and 0 <= x < mask.shape[1]) or not mask[y, x]:
                continue
            seen.add((y, x))
            region.add((y, x))
            todo.extend((y + dy, x + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
        regions.append(region)
    return regions


def _reference_aupro(masks: np.ndarray, maps: np.ndarray, max_fpr: float = 0.3) -> float:
    """Slow AUPRO: threshold at every distinct score, count overlaps region by region, integrate with
    trapezoids up to max_fpr (the last segment cut there by linear interpolation)."""
    regions = [(i, r) for i, m in enumerate(masks) for r in _components(m)]
    good = masks == 0
    points = [(0.0, 0.0)]
    for t in sorted(set(maps.ravel().tolist()), reverse=True):
        above = maps >= t
        fpr = (above & good).sum() / good.sum()
        pro = np.mean([sum(above[i][p] for p in r) / len(r) for i, r in regions])
        points.append((float(fpr), float(pro)))
    area = 0.0
    for (f0, p0), (f1, p1) in zip(points, points[1:]):
        if f0 >= max_fpr:
            break
        if f1 > max_fpr:
            p1 = p0 + (p1 - p0) * (max_fpr - f0) / (f1 - f0)
            f1 = max_fpr
        area += (f1 - f0) * (p0 + p1) / 2
    return area / max_fpr


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupro_matches_a_slow_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    masks = np.zeros((4, 12, 12), dtype=np.uint8)
    masks[0, 2:5, 2:6] = 1  # two regions of different sizes in one image
    masks[0, 8:10, 8:9] = 1
    masks[1, 5:11, 1:3] = 1
    masks[1, 4, 3] = 1  # touches the region above only diagonally: 8-connected, one region
    maps = rng.random(masks.shape) + 0.6 * masks  # defects score higher on average
    maps = np.round(maps, 2)  # ties between pixels, as flat maps have
    assert aupro(masks, maps) == pytest.approx(_reference_aupro(masks, maps), abs=1e-12)
    assert aupro(masks, maps, max_fpr=0.05) == pytest.approx(_reference_aupro(masks, maps, 0.05), abs=1e-12)


def test_aupro_counts_regions_not_pixels() -> None:
    masks = np.zeros((2, 10, 10), dtype=np.uint8)
    masks[0, :6, :6] = 1  # a large region
    masks[1, 0, 0] = 1  # a one-pixel region
    maps = np.full(masks.shape, 0.5)
    maps[0, :6, :6] = 1.0  # the large region is found before any good pixel,
    maps[1, 0, 0] = 0.0  # the small one only after every good pixel
    # PRO is 0.5 from FPR 0 on: half the regions, though 36 of 37 defect pixels
    assert aupro(masks, maps) == pytest.approx(0.5)
    assert aupro(masks, np.where(masks > 0, 1.0, 0.0)) == pytest.approx(1.0)
    with pytest.warns(SingleClassWarning, match="AUPRO"):
        assert aupro(np.zeros((1, 4, 4)), np.ones((1, 4, 4))) is None


def test_per_defect_statistics() -> None:
    scores = np.array([1.0, 2.0, 3.0, 5.0, 0.5, 4.0])
    types = ["good", "good", "crack", "crack", "stain", "stain"]
    table = per_defect(scores, types)
    assert list(table) == ["good", "crack", "stain"]
    assert table["good"] == {"n": 2, "mean": 1.5, "std": 0.5, "min": 1.0, "max": 2.0}
    assert table["crack"]["auroc"] == 1.0 and table["crack"]["mean"] == 4.0
    assert table["stain"]["auroc"] == 0.5  # 0.5 below both good, 4.0 above both
    assert per_defect(np.array([3.0]), ["crack"])["crack"]["auroc"] is None
    named = per_defect(scores, types, names=["good", "stain", "hole", "crack"])  # e.g. the union over envoys
    assert list(named) == ["good", "crack", "hole", "stain"] and named["crack"] == table["crack"]
    assert named["hole"] == {"n": 0, "mean": None, "std": None, "min": None, "max": None, "auroc": None}
    with pytest.raises(ValueError, match="2 scores but 1"):
        per_defect(np.array([1.0, 2.0]), ["good"])


def test_per_defect_table_survives_flat_metrics() -> None:
    table = per_defect(np.array([1.0, 2.0, 3.0, 0.5]), ["good", "good", "stain", "crack"])
    flat = flatten_defects(table)
    assert flat["defect/stain/auroc"] == 1.0 and flat["defect/good/n"] == 2.0
    plain, back = split_defects({**flat, "det_sum": 0.9})
    assert plain == {"det_sum": 0.9}
    assert list(back) == ["good", "crack", "stain"] and back["crack"]["auroc"] == 0.0
    assert back == {name: {k: float(v) for k, v in row.items()} for name, row in table.items()}
