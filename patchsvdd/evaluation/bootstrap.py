"""Paired bootstrap intervals for the difference of two models' AUROCs on the same test images.

The test images are resampled with replacement within their class (good, defective), the same draw for both
models, and the difference of the two AUROCs recomputed for each draw; the interval is the percentiles of
those differences. Detection uses the image scores themselves; segmentation uses, per image, a sketch of its
good and its defective pixels' scores (``SKETCH`` evenly spaced quantiles, each weighted by the pixels it
stands for), so that a draw costs a weighted AUROC over a few thousand points instead of millions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

SKETCH = 32  # points per image and pixel class in the segmentation sketches


@dataclass(frozen=True)
class Interval:
    """``difference`` (b - a on all test images) and its bootstrap ``low``/``high`` (``level``, e.g. 0.95)."""

    difference: float
    low: float
    high: float
    level: float

    def __str__(self) -> str:
        return f"{self.difference:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


@dataclass(frozen=True)
class PixelSketch:
    """Per image (M), the sketch of its good and its defective pixels' scores: ``points`` (M,2,P) and
    ``weights`` (M,2,P) (0 where an image has no pixel of that class)."""

    points: np.ndarray
    weights: np.ndarray


def pixel_sketch(maps: torch.Tensor | np.ndarray, masks: np.ndarray, size: int = SKETCH) -> PixelSketch:
    """Sketch (see ``PixelSketch``) of anomaly ``maps`` (M,H,W) against 0/1 ``masks`` (M,H,W)."""
    maps = np.asarray(torch.as_tensor(maps).float().numpy(), dtype=np.float64)
    levels = (np.arange(size) + 0.5) / size
    points = np.zeros((len(maps), 2, size))
    weights = np.zeros((len(maps), 2, size))
    for i, (scores, mask) in enumerate(zip(maps, np.asarray(masks).astype(bool), strict=True)):
        for label, chosen in enumerate((scores[~mask], scores[mask])):
            if chosen.size:
                points[i, label] = np.quantile(chosen, levels)
                weights[i, label] = chosen.size / size
    return PixelSketch(points, weights)


def detection_auroc(labels: np.ndarray, scores: np.ndarray) -> Callable[[np.ndarray], float]:
    """The image AUROC of the test images at given indices (N,), labels (M,) and image scores (M,)."""
    return lambda index: float(roc_auc_score(labels[index], scores[index]))


def segmentation_auroc(sketch: PixelSketch) -> Callable[[np.ndarray], float]:
    """The pixel AUROC, from the sketches, of the test images at given indices."""

    def auroc(index: np.ndarray) -> float:
        points, weights = sketch.points[index], sketch.weights[index]
        truth = np.broadcast_to(np.array([0, 1])[None, :, None], points.shape)
        keep = weights > 0
        return float(roc_auc_score(truth[keep], points[keep], sample_weight=weights[keep]))

    return auroc


def class_resamples(labels: np.ndarray, n: int, seed: int) -> list[np.ndarray]:
    """``n`` index draws (M,) of the test images with replacement, within each class of ``labels``."""
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(labels == value) for value in np.unique(labels)]
    return [np.concatenate([rng.choice(group, size=group.size, replace=True) for group in groups]) for _ in range(n)]


def paired_interval(
    metric_a: Callable[[np.ndarray], float],
    metric_b: Callable[[np.ndarray], float],
    labels: np.ndarray,
    n: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> Interval:
    """b - a of two metrics of the same test images (``labels`` (M,) 0/1), and its paired bootstrap
    interval (``n`` draws within class, percentiles at (1 ± ``level``) / 2)."""
    everything = np.arange(len(labels))
    differences = np.array([metric_b(draw) - metric_a(draw) for draw in class_resamples(labels, n, seed)])
    low, high = np.quantile(differences, [(1 - level) / 2, (1 + level) / 2])
    return Interval(metric_b(everything) - metric_a(everything), float(low), float(high), level)


def bootstrap_interval(
    metric: Callable[[np.ndarray], float], labels: np.ndarray, n: int = 1000, seed: int = 0, level: float = 0.95
) -> Interval:
    """One metric of the test images (``labels`` (M,) 0/1) and its bootstrap interval (draws within class)."""
    return paired_interval(lambda index: 0.0, metric, labels, n, seed, level)
