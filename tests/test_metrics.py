"""AUROC on hand-checked cases and the single-class case."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from patchsvdd.metrics import METRIC_KEYS, SingleClassWarning, auroc, category_metrics


def test_auroc_hand_checked() -> None:
    assert auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert auroc(np.array([0, 0, 1, 1]), np.array([0.4, 0.3, 0.2, 0.1])) == 0.0
    # Pairs (pos, neg): (0.35>0.1) (0.35>0.4 no) (0.8>0.1) (0.8>0.4) -> 3 of 4.
    assert auroc(np.array([0, 1, 0, 1]), np.array([0.1, 0.35, 0.4, 0.8])) == 0.75
    assert auroc(np.array([0, 1]), np.array([0.5, 0.5])) == 0.5  # ties count half


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
    assert sorted(result) == sorted(METRIC_KEYS)
    assert result["det_64"] == 1.0
    assert result["seg_64"] == 1.0
    maps[1, 0, 0] = 0.5  # now below the good image's warm pixel
    result = category_metrics({"64": maps}, labels, masks)
    assert result["det_64"] == 0.5 and result["seg_64"] == pytest.approx(46 / 47)
    with pytest.warns(SingleClassWarning):
        none = category_metrics({"64": maps}, np.zeros(3), np.zeros((3, 4, 4)))
    assert none == {"det_64": None, "seg_64": None}
