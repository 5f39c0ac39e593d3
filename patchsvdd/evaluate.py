"""Scoring a category end to end: embed training and test images, search, maps, metrics.

Shared by the command line, the benchmarks and the federated validation task.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .data import CategoryData, standardise
from .metrics import category_metrics, per_defect
from .model import PatchSVDD
from .scoring import CategoryScores, SearchMode, anomaly_maps, embed_images


@dataclass
class Evaluation:
    """metrics: det_/seg_ AUROC and aupro_ per fusion (None where undefined); scores: maps (M,H,W) per
    fusion; defects: image-score statistics per defect type, per fusion (see ``metrics.per_defect``)."""

    metrics: dict[str, float | None]
    scores: CategoryScores
    seconds: dict[str, float] = field(default_factory=dict)
    defects: dict[str, dict[str, dict]] = field(default_factory=dict)


def evaluate_category(
    model: PatchSVDD, data: CategoryData, mode: SearchMode = "exact", batch_size: int = 8, progress: bool = False,
    mean: np.ndarray | None = None, with_aupro: bool = True, defect_names: Sequence[str] | None = None,
) -> Evaluation:
    """Score ``data``'s test images against all of its training patches with ``model`` (on its device).

    Both splits are standardised with the *training* mean: ``data.mean``, or
    ``mean`` (H,W,3) when given (e.g. the mean of a fuller training set).
    ``with_aupro=False`` skips AUPRO (a few seconds a fusion on a full category). ``defect_names``:
    the defect types the per-defect tables list (default: those in ``data``; see ``metrics.per_defect``).
    """
    device = next(model.parameters()).device
    mean = data.mean if mean is None else mean
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    train_emb = embed_images(model, standardise(data.train_images, mean), batch_size, progress)
    test_emb = embed_images(model, standardise(data.test_images, mean), batch_size, progress)
    seconds["embed"] = time.perf_counter() - start
    scores = anomaly_maps(train_emb, test_emb, mode=mode, device=device)
    seconds.update(scores.seconds)
    start = time.perf_counter()
    metrics = category_metrics(scores.maps, data.test_labels, data.test_masks, with_aupro=with_aupro)
    defects = {fusion: per_defect(scores.image_scores(fusion).numpy(), data.defect_types, defect_names)
               for fusion in scores.maps}
    seconds["metrics"] = time.perf_counter() - start
    return Evaluation(metrics=metrics, scores=scores, seconds=seconds, defects=defects)


def image_scores(evaluation: Evaluation, fusion: str) -> np.ndarray:
    """Image scores (M,) of one fusion as numpy."""
    return evaluation.scores.image_scores(fusion).numpy()
