"""Detection and segmentation AUROC (scikit-learn), tolerant of single-class test sets."""

from __future__ import annotations

import warnings
from typing import Mapping

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from .scoring import FUSIONS

METRIC_KEYS = tuple(f"{task}_{fusion}" for fusion in FUSIONS for task in ("det", "seg"))


class SingleClassWarning(UserWarning):
    """AUROC is undefined: the test set holds only good or only defective samples."""


def auroc(labels: np.ndarray, scores: np.ndarray, what: str = "AUROC") -> float | None:
    """Area under the ROC curve, or None (with a warning) when ``labels`` hold one class only."""
    labels = np.asarray(labels).ravel()
    if np.unique(labels).size < 2:
        warnings.warn(f"{what}: test set has only label {labels[:1].tolist()}; AUROC is undefined", SingleClassWarning, stacklevel=2)
        return None
    return float(roc_auc_score(labels, np.asarray(scores, dtype=np.float64).ravel()))


def category_metrics(maps: Mapping[str, torch.Tensor], labels: np.ndarray, masks: np.ndarray) -> dict[str, float | None]:
    """det_<f> and seg_<f> for each fusion f of ``maps`` (each (M,H,W)).

    Detection uses the map maximum per image against ``labels`` (M,);
    segmentation uses every pixel against ``masks`` (M,H,W) of 0/1.
    """
    out: dict[str, float | None] = {}
    for fusion, amap in maps.items():
        scores = amap.flatten(1).amax(dim=1).numpy()
        out[f"det_{fusion}"] = auroc(labels, scores, f"detection AUROC ({fusion})")
        out[f"seg_{fusion}"] = auroc(masks, amap.numpy(), f"segmentation AUROC ({fusion})")
    return out
