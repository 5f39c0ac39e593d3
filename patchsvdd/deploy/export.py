"""Making a site bundle: from a model and the site's own images, with thresholds calibrated there."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from torch import nn

from patchsvdd.data.mvtec import GOOD, CategoryData, holdout_split
from patchsvdd.deploy.bundle import Bundle, write_bundle
from patchsvdd.deploy.calibration import GOOD_QUANTILE, Threshold, choose_threshold
from patchsvdd.deploy.inspector import Inspector
from patchsvdd.evaluation.metrics import per_defect
from patchsvdd.models.base import BankSearch
from patchsvdd.models.registry import family_of


@dataclass
class Calibration:
    """What export measured on the calibration images: image scores (M,), maps (M,H,W), and the table
    of scores per defect type."""

    scores: np.ndarray
    labels: np.ndarray
    defects: dict
    note: str


def export_bundle(
    model: nn.Module,
    data: CategoryData,
    out: str | os.PathLike,
    bank_fraction: float = 1.0,
    max_fpr: float | None = None,
    calibration: CategoryData | None = None,
    info: dict | None = None,
    search: BankSearch = "auto",
    holdout_fraction: float = 0.1,
    subsample: str = "kcenter",
) -> tuple[Inspector, Calibration]:
    """Build and write a site bundle from ``model`` and the site's ``data`` (its training images make
    Patch SVDD's memory banks and mean, or the autoencoder's error scales); calibrate the thresholds on
    ``calibration`` (default: ``data``'s test split).

    With defective calibration images: image threshold at maximum F1 (or at ``max_fpr`` on good images),
    pixel threshold the same on the masks. Without: ``holdout_fraction`` of the training images stay out
    of the banks and a high quantile of good scores is the threshold. ``bank_fraction`` < 1 keeps that
    share of the patches, chosen by ``subsample`` (Patch SVDD; see ``models.patchsvdd.bank.memory_banks``).
    """
    calibration = calibration if calibration is not None else data
    labelled = calibration.test_labels.size > 0 and calibration.test_labels.max() == 1
    fit, held = holdout_split(len(data.train_images), 0.0 if labelled else holdout_fraction)
    placeholder = Threshold(value=float("inf"), method="none", low=0.0, high=1.0)
    state = family_of(model).site_state(model, data.train_images[fit], data.mean, bank_fraction, subsample)
    bundle = Bundle(model, state, placeholder, placeholder, dict(info or {}))
    inspector = Inspector(bundle, device=str(next(model.parameters()).device), search=search)
    maps = inspector.maps(calibration.test_images)
    scores = maps.reshape(len(maps), -1).max(axis=1)
    if labelled:
        image_threshold = choose_threshold(calibration.test_labels, scores, max_fpr=max_fpr)
        pixel_threshold = choose_threshold(calibration.test_masks, maps, max_fpr=max_fpr)
        note = (
            f"calibrated on {len(scores)} labelled images ({int(calibration.test_labels.sum())} defective): "
            f"{image_threshold.method}"
        )
    else:  # every image here is good: held-out training images and the good calibration images set the bar
        held_maps = inspector.maps(data.train_images[held])
        pool_maps = np.concatenate([held_maps, maps])
        pool = pool_maps.reshape(len(pool_maps), -1).max(axis=1)
        image_threshold = choose_threshold(np.zeros(len(pool)), pool)
        pixel_threshold = choose_threshold(np.zeros(pool_maps.size), pool_maps.ravel())
        note = (
            f"no defective image to calibrate on: thresholds are the {GOOD_QUANTILE} quantile of the scores of "
            f"{len(pool)} good images ({len(held)} held out of the bank); check them on a few known defects"
        )
    bundle.image_threshold, bundle.pixel_threshold = image_threshold, pixel_threshold
    bundle.info.update(
        category=data.category,
        bank_fraction=bank_fraction,
        bank_subsample=subsample,
        calibration_note=note,
        n_train_in_bank=int(len(fit)),
        n_calibration=int(len(scores)),
    )
    write_bundle(bundle, out)
    types = calibration.defect_types or [GOOD if label == 0 else "defective" for label in calibration.test_labels]
    return inspector, Calibration(
        scores=scores, labels=calibration.test_labels, defects=per_defect(scores, types), note=note
    )
