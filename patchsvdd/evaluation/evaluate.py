"""Scoring a category end to end: maps of the test images (Patch SVDD: embed, search; the autoencoder:
reconstruct), then the metrics.

Shared by the command line, the benchmarks and the federated validation task.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from patchsvdd.models.autoencoder.network import ConvAutoencoder, good_scales, image_maps
from patchsvdd.data.mvtec import CategoryData, standardise
from patchsvdd.evaluation.metrics import category_metrics, per_defect
from patchsvdd.models.patchsvdd.network import PatchSVDD
from patchsvdd.models.patchsvdd.scoring import CategoryScores, SearchMode, anomaly_maps, embed_images


@dataclass
class Evaluation:
    """metrics: det_/seg_ AUROC and aupro_ per fusion (None where undefined); scores: maps (M,H,W) per
    fusion; defects: image-score statistics per defect type, per fusion (see ``metrics.per_defect``)."""

    metrics: dict[str, float | None]
    scores: CategoryScores
    seconds: dict[str, float] = field(default_factory=dict)
    defects: dict[str, dict[str, dict]] = field(default_factory=dict)


def evaluate_category(
    model: PatchSVDD | ConvAutoencoder, data: CategoryData, mode: SearchMode = "exact", batch_size: int = 8, progress: bool = False,
    mean: np.ndarray | None = None, with_aupro: bool = True, defect_names: Sequence[str] | None = None,
) -> Evaluation:
    """Score ``data``'s test images with ``model`` (on its device): Patch SVDD against all of the training
    patches; the autoencoder by its reconstruction error (``mode``, ``batch_size``, ``mean`` unused).

    Both splits are standardised with the *training* mean: ``data.mean``, or
    ``mean`` (H,W,3) when given (e.g. the mean of a fuller training set).
    ``with_aupro=False`` skips AUPRO (a few seconds a fusion on a full category). ``defect_names``:
    the defect types the per-defect tables list (default: those in ``data``; see ``metrics.per_defect``).
    """
    if isinstance(model, ConvAutoencoder):
        scores = reconstruction_scores(model, data.train_images, data.test_images)
    else:
        device = next(model.parameters()).device
        mean = data.mean if mean is None else mean
        start = time.perf_counter()
        train_emb = embed_images(model, standardise(data.train_images, mean), batch_size, progress)
        test_emb = embed_images(model, standardise(data.test_images, mean), batch_size, progress)
        embed_seconds = time.perf_counter() - start
        scores = anomaly_maps(train_emb, test_emb, mode=mode, device=device)
        scores.seconds = {"embed": embed_seconds, **scores.seconds}
    seconds = dict(scores.seconds)
    start = time.perf_counter()
    metrics = category_metrics(scores.maps, data.test_labels, data.test_masks, with_aupro=with_aupro)
    defects = {fusion: per_defect(scores.image_scores(fusion).numpy(), data.defect_types, defect_names)
               for fusion in scores.maps}
    seconds["metrics"] = time.perf_counter() - start
    return Evaluation(metrics=metrics, scores=scores, seconds=seconds, defects=defects)


def reconstruction_scores(model: ConvAutoencoder, train_images: np.ndarray, test_images: np.ndarray) -> CategoryScores:
    """The autoencoder's maps (``autoencoder.FUSIONS``) of uint8 test images (M,H,W,3); the good training
    images (N,H,W,3) set the scale of each error for the 'sum' fusion (see ``autoencoder.fuse``)."""
    start = time.perf_counter()
    scales = good_scales(model, train_images)
    seconds = {"scales": time.perf_counter() - start}
    start = time.perf_counter()
    maps = image_maps(model, test_images, scales)
    seconds["reconstruct"] = time.perf_counter() - start
    return CategoryScores(maps=maps, seconds=seconds)


def image_scores(evaluation: Evaluation, fusion: str) -> np.ndarray:
    """Image scores (M,) of one fusion as numpy."""
    return evaluation.scores.image_scores(fusion).numpy()
