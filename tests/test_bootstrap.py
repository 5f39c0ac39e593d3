"""Paired bootstrap intervals of AUROC differences (evaluation/bootstrap.py)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

from patchsvdd.evaluation import bootstrap


def scored_images(seed: int, separation: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """labels (40,), masks (40,32,32), maps (40,32,32) and image scores (40,): defects brighter by
    ``separation``; an image scores its mean."""
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1], 20)
    masks = np.zeros((40, 32, 32), np.uint8)
    masks[20:, 8:16, 8:16] = 1
    maps = rng.random((40, 32, 32)) + separation * masks
    return labels, masks, maps, maps.reshape(40, -1).mean(axis=1)


def test_the_pixel_sketch_gives_the_pixel_auroc_closely() -> None:
    _, masks, maps, _ = scored_images(0, 0.3)
    sketch = bootstrap.pixel_sketch(maps, masks)
    exact = roc_auc_score(masks.ravel(), maps.ravel())
    assert abs(bootstrap.segmentation_auroc(sketch)(np.arange(40)) - exact) < 0.005


def test_draws_keep_each_class_its_size() -> None:
    labels = np.array([0] * 7 + [1] * 3)
    for draw in bootstrap.class_resamples(labels, 20, seed=1):
        assert (labels[draw] == 0).sum() == 7 and (labels[draw] == 1).sum() == 3


def test_a_model_against_itself_differs_by_nothing_and_a_better_one_by_an_interval_above_zero() -> None:
    labels, masks, maps, scores = scored_images(0, 0.2)
    _, _, better_maps, better = scored_images(1, 1.0)
    same = bootstrap.paired_interval(
        bootstrap.detection_auroc(labels, scores), bootstrap.detection_auroc(labels, scores), labels, 200
    )
    assert (same.difference, same.low, same.high) == (0.0, 0.0, 0.0)
    gain = bootstrap.paired_interval(
        bootstrap.detection_auroc(labels, scores), bootstrap.detection_auroc(labels, better), labels, 200
    )
    assert gain.difference == roc_auc_score(labels, better) - roc_auc_score(labels, scores)
    assert 0 < gain.low <= gain.difference <= gain.high
    seg = bootstrap.paired_interval(
        bootstrap.segmentation_auroc(bootstrap.pixel_sketch(maps, masks)),
        bootstrap.segmentation_auroc(bootstrap.pixel_sketch(better_maps, masks)),
        labels,
        200,
    )
    assert seg.low > 0
    alone = bootstrap.bootstrap_interval(bootstrap.detection_auroc(labels, scores), labels, 200)
    assert alone.low <= alone.difference == roc_auc_score(labels, scores) <= alone.high
