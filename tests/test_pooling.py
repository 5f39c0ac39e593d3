"""AUROC pooled over sites from their score sketches: exact for small test sets, close for pixels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from patchsvdd.evaluation import report
from patchsvdd.evaluation.pooling import SKETCH_SIZE, pooled_aurocs, score_sketch, sketch_metrics, split_sketches


def _site(
    rng: np.random.Generator, good: int, defective: int, shift: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """maps (M,32,32), labels (M,), masks (M,32,32): a square defect brighter than the noise."""
    maps = rng.normal(size=(good + defective, 32, 32)).astype(np.float32) + shift
    labels = np.r_[np.zeros(good), np.ones(defective)].astype(np.int64)
    masks = np.zeros(maps.shape, dtype=np.uint8)
    masks[good:, 4:12, 6:14] = 1
    maps[masks == 1] += 1.0
    return maps, labels, masks


def test_sketch_is_the_sorted_scores_or_quantiles() -> None:
    sketch = score_sketch(np.array([3.0, 1.0, 2.0]), size=5)
    np.testing.assert_array_equal(sketch[:3], [1.0, 2.0, 3.0])
    assert np.isnan(sketch[3:]).all()
    many = score_sketch(np.arange(1000.0), size=4)
    np.testing.assert_allclose(many, np.quantile(np.arange(1000.0), [0.125, 0.375, 0.625, 0.875]))


def test_pooled_auroc_ranks_all_sites_together() -> None:
    """Image level: exact (<= SKETCH_SIZE images per class); pixel level: within 0.002 of the exact pooled
    AUROC; and not the sites' mean: the second site's scores are shifted, as another bank might shift them."""
    rng = np.random.default_rng(0)
    sites = {"envoy_1": _site(rng, 20, 40, 0.0), "envoy_2": _site(rng, 25, 38, 0.8)}
    sketches = {name: sketch_metrics(torch.from_numpy(m), labels, masks) for name, (m, labels, masks) in sites.items()}
    assert all(len(s) == 2 * 2 * (SKETCH_SIZE + 1) for s in sketches.values())  # one metric set for every site
    pooled = pooled_aurocs(sketches)
    maps = np.concatenate([m for m, _, _ in sites.values()])
    labels = np.concatenate([lab for _, lab, _ in sites.values()])
    masks = np.concatenate([mk for _, _, mk in sites.values()])
    exact_det = roc_auc_score(labels, maps.reshape(len(maps), -1).max(axis=1))
    assert pooled["det_sum"] == pytest.approx(exact_det, abs=1e-12)
    assert pooled["seg_sum"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=0.002)
    per_site = [roc_auc_score(lab, m.reshape(len(m), -1).max(axis=1)) for m, lab, _ in sites.values()]
    assert abs(pooled["det_sum"] - np.mean(per_site)) > 0.01


def test_final_evaluation_adds_a_pooled_row_and_keeps_tables_per_envoy() -> None:
    rng = np.random.default_rng(1)
    streamed = {}
    for name in ("envoy_1", "envoy_2"):
        maps, labels, masks = _site(rng, 3, 5, 0.0)
        streamed[name] = {"det_sum": 0.9, "defect/good/n": 3.0, **sketch_metrics(torch.from_numpy(maps), labels, masks)}
    streamed["aggregator"] = {"det_sum": 0.9, "defect/good/n": 3.0, "pool/det/good/n": 3.0}
    per_node, per_defect = report.final_evaluation(streamed)
    assert set(per_node) == {"envoy_1", "envoy_2", "aggregator", "pooled"} and set(per_defect) == {"envoy_1", "envoy_2"}
    assert per_node["envoy_1"] == {"det_sum": 0.9} and set(per_node["pooled"]) == {"det_sum", "seg_sum"}
    assert [row["node"] for row in report.metrics_rows(per_node, ["det_sum"])] == [
        "envoy_1",
        "envoy_2",
        "aggregator",
        "pooled",
    ]
    plain, sketch = split_sketches(streamed["envoy_1"])
    assert set(plain) == {"det_sum", "defect/good/n"} and all(k.startswith("pool/") for k in sketch)


def test_pooled_auroc_is_none_without_both_classes() -> None:
    maps = torch.rand(3, 8, 8)
    sketch = sketch_metrics(maps, np.zeros(3, dtype=np.int64), np.zeros((3, 8, 8), dtype=np.uint8))
    assert sketch["pool/det/defective/n"] == 0.0 and math.isnan(sketch["pool/det/defective/000"])
    assert pooled_aurocs({"only_good": sketch}) == {"det_sum": None, "seg_sum": None}
