"""AUROC pooled over sites from fixed-size score sketches: what each site reports so that the
federation can score all test images together without any image or map leaving a site.

A site's aggregated AUROC (the aggregator's mean of the sites' AUROCs, weighted by test size) is not the
AUROC of all test images together: a threshold is shared by every site, so site A's good images also compete
with site B's defective ones. Ranking across sites needs the scores, and OpenFL's aggregator needs the same
metric names from every site, so each site reports a *sketch* of ``SKETCH_SIZE`` points per class (good,
defective) and per level (image scores for detection, pixel scores for segmentation): its sorted scores
padded with NaN when it has at most that many (exact), else that many evenly spaced quantiles (each point
then stands for n/``SKETCH_SIZE`` scores). The pooled AUROC is the weighted AUROC of all sites' points.
Each site scores against its own bank, so the pooled figure assumes the sites' scores share one scale (the
same product, one model): read it beside the per-site ones.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

SKETCH_PREFIX = "pool/"
SKETCH_SIZE = 128
LEVELS = ("det", "seg")  # image scores against image labels; pixel scores against masks
CLASSES = ("good", "defective")


def score_sketch(scores: np.ndarray, size: int = SKETCH_SIZE) -> np.ndarray:
    """(size,) float64: the sorted ``scores`` padded with NaN when there are at most ``size`` of them,
    else the quantiles at levels (k + 0.5) / size, k = 0..size-1."""
    scores = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    if scores.size <= size:
        return np.concatenate([scores, np.full(size - scores.size, np.nan)])
    return np.quantile(scores, (np.arange(size) + 0.5) / size)


def sketch_metrics(
    maps: torch.Tensor | np.ndarray, labels: np.ndarray, masks: np.ndarray, size: int = SKETCH_SIZE
) -> dict[str, float]:
    """A site's sketches as flat metrics 'pool/<level>/<class>/n' (count) and 'pool/<level>/<class>/<k>'.

    maps (M,H,W) anomaly maps of one fusion; labels (M,) 0 good / 1 defective; masks (M,H,W) 0/1.
    Image score = map maximum (as ``metrics.category_metrics``)."""
    maps = torch.as_tensor(maps)
    image = maps.flatten(1).amax(dim=1).numpy()
    pixel = maps.numpy().ravel()
    truth = {"det": np.asarray(labels).ravel().astype(bool), "seg": np.asarray(masks).ravel().astype(bool)}
    out: dict[str, float] = {}
    for level, scores in (("det", image), ("seg", pixel)):
        for name, chosen in (("good", scores[~truth[level]]), ("defective", scores[truth[level]])):
            out[f"{SKETCH_PREFIX}{level}/{name}/n"] = float(chosen.size)
            for k, value in enumerate(score_sketch(chosen, size)):
                out[f"{SKETCH_PREFIX}{level}/{name}/{k:03d}"] = float(value)
    return out


def split_sketches(metrics: Mapping[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """(the other metrics, the sketch metrics) of one site's flat metrics."""
    plain = {k: v for k, v in metrics.items() if not k.startswith(SKETCH_PREFIX)}
    return plain, {k: v for k, v in metrics.items() if k.startswith(SKETCH_PREFIX)}


def _points(sketch: Mapping[str, float], level: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(points, weights) of one class at one level of a site's sketch; each point stands for n/len scores."""
    prefix = f"{SKETCH_PREFIX}{level}/{name}/"
    count = sketch.get(prefix + "n", math.nan)
    values = np.array([v for k, v in sorted(sketch.items()) if k.startswith(prefix) and not k.endswith("/n")])
    values = values[np.isfinite(values)]
    if not values.size or not math.isfinite(count) or count <= 0:
        return np.empty(0), np.empty(0)
    return values, np.full(values.size, count / values.size)


def pooled_aurocs(sketches: Mapping[str, Mapping[str, float]], fusion: str = "sum") -> dict[str, float | None]:
    """{'det_<fusion>', 'seg_<fusion>'}: the AUROC of every site's scores together, from each site's
    sketch (``sketch_metrics``); None where the sites together lack good or defective samples."""
    out: dict[str, float | None] = {}
    for level in LEVELS:
        scores, labels, weights = [], [], []
        for sketch in sketches.values():
            for label, name in enumerate(CLASSES):
                points, weight = _points(sketch, level, name)
                scores.append(points)
                weights.append(weight)
                labels.append(np.full(points.size, label))
        labels_all = np.concatenate(labels)
        out[f"{level}_{fusion}"] = (
            float(roc_auc_score(labels_all, np.concatenate(scores), sample_weight=np.concatenate(weights)))
            if np.unique(labels_all).size == 2
            else None
        )
    return out
