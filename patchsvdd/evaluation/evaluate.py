"""Scoring a category end to end: maps of the test images (the model's family: Patch SVDD embeds and
searches, the autoencoder reconstructs), then the metrics.

Shared by the command line, the benchmarks and the federated validation task.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from patchsvdd.data.mvtec import CategoryData
from patchsvdd.evaluation.metrics import category_metrics, per_defect
from patchsvdd.models.base import CategoryScores, Scoring, SearchMode
from patchsvdd.models.registry import family_of


@dataclass
class Evaluation:
    """metrics: det_/seg_ AUROC and aupro_ per fusion (None where undefined); scores: maps (M,H,W) per
    fusion; defects: image-score statistics per defect type, per fusion (see ``metrics.per_defect``)."""

    metrics: dict[str, float | None]
    scores: CategoryScores
    seconds: dict[str, float] = field(default_factory=dict)
    defects: dict[str, dict[str, dict]] = field(default_factory=dict)


def evaluate_category(
    model: nn.Module,
    data: CategoryData,
    mode: SearchMode = "exact",
    batch_size: int = 8,
    progress: bool = False,
    mean: np.ndarray | None = None,
    with_aupro: bool = True,
    defect_names: Sequence[str] | None = None,
) -> Evaluation:
    """Score ``data``'s test images with ``model`` (on its device): Patch SVDD against all of the training
    patches; the autoencoder by its reconstruction error (``mode``, ``batch_size``, ``mean`` unused).

    Both splits are standardised with the *training* mean: ``data.mean``, or
    ``mean`` (H,W,3) when given (e.g. the mean of a fuller training set).
    ``with_aupro=False`` skips AUPRO (a few seconds a fusion on a full category). ``defect_names``:
    the defect types the per-defect tables list (default: those in ``data``; see ``metrics.per_defect``).
    """
    scoring = Scoring(mean=data.mean if mean is None else mean, search=mode, batch_size=batch_size, progress=progress)
    scores = family_of(model).category_maps(model, data.train_images, data.test_images, scoring)
    seconds = dict(scores.seconds)
    start = time.perf_counter()
    metrics = category_metrics(scores.maps, data.test_labels, data.test_masks, with_aupro=with_aupro)
    defects = {
        fusion: per_defect(scores.image_scores(fusion).numpy(), data.defect_types, defect_names)
        for fusion in scores.maps
    }
    seconds["metrics"] = time.perf_counter() - start
    return Evaluation(metrics=metrics, scores=scores, seconds=seconds, defects=defects)


def image_scores(evaluation: Evaluation, fusion: str) -> np.ndarray:
    """Image scores (M,) of one fusion as numpy."""
    return evaluation.scores.image_scores(fusion).numpy()
