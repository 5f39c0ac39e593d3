"""Making a site bundle: from a model and the site's own images, with thresholds calibrated there."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import nn

from patchsvdd.data.mvtec import GOOD, CategoryData, holdout_split
from patchsvdd.deploy.bundle import Bundle, write_bundle
from patchsvdd.deploy.calibration import GOOD_QUANTILE, Threshold, choose_threshold
from patchsvdd.deploy.inspector import Inspector
from patchsvdd.evaluation.metrics import auroc, per_defect
from patchsvdd.models.base import BankSearch, SiteState
from patchsvdd.models.registry import family_of


@dataclass
class Calibration:
    """What export measured on the calibration images: image scores (M,), maps (M,H,W), and the table
    of scores per defect type."""

    scores: np.ndarray
    labels: np.ndarray
    defects: dict
    note: str
    bank_choice: list[dict] = field(default_factory=list)  # 'auto': each candidate bank's rows, AUROCs, size


AUTO_FRACTIONS = (0.05, 0.1, 0.2, 0.5)  # the k-center banks 'auto' tries, smallest first
AUTO_TOLERANCE = 0.005  # 'auto' keeps the smallest bank whose AUROCs are within this of the full bank's
BankFraction = float | str  # a share in (0, 1], or 'auto'


def _aurocs(calibration: CategoryData, maps: np.ndarray) -> tuple[float | None, float | None]:
    """(image AUROC of the map maxima, pixel AUROC) of maps (M,H,W) on labelled calibration images."""
    scores = maps.reshape(len(maps), -1).max(axis=1)
    det = auroc(calibration.test_labels, scores)
    seg = auroc(calibration.test_masks, maps) if calibration.test_masks.any() else None
    return det, seg


def choose_bank(
    model: nn.Module,
    good_images: np.ndarray,
    mean: np.ndarray,
    calibration: CategoryData,
    search: BankSearch = "auto",
    fractions: tuple[float, ...] = AUTO_FRACTIONS,
    tolerance: float = AUTO_TOLERANCE,
) -> tuple[float, list[dict], SiteState]:
    """The smallest k-center bank fraction whose image and pixel AUROCs on the labelled ``calibration``
    images stay within ``tolerance`` of the full bank's (1.0 when none does), the table of what each
    candidate measured (fraction, rows of the K=32 bank, det and seg AUROC, megabytes), and its state."""
    family = family_of(model)
    device = str(next(model.parameters()).device)
    rows: list[dict] = []

    candidates = [1.0, *sorted(fractions)]
    states = dict(zip(candidates, family.site_states(model, good_images, mean, candidates, "kcenter")))

    def measure(fraction: float) -> tuple[float | None, float | None]:
        state = states[fraction]
        bundle = Bundle(model, state, _PLACEHOLDER, _PLACEHOLDER, {})
        det, seg = _aurocs(calibration, Inspector(bundle, device=device, search=search).maps(calibration.test_images))
        megabytes = sum(bank.nbytes for bank in state.banks.values()) / 1e6
        rows.append(
            {
                "fraction": fraction,
                "rows_32": int(len(state.banks.get(32, ()))),
                "det_auroc": det,
                "seg_auroc": seg,
                "bank_mb": round(megabytes, 2),
                "chosen": "",
            }
        )
        return det, seg

    full_det, full_seg = measure(1.0)
    chosen = 1.0
    for fraction in sorted(fractions):
        det, seg = measure(fraction)
        close = all(a is None or b is None or a - b <= tolerance for a, b in ((full_det, det), (full_seg, seg)))
        if close:
            chosen = fraction
            break
    for row in rows:
        row["chosen"] = "yes" if row["fraction"] == chosen else ""
    return chosen, rows, states[chosen]


_PLACEHOLDER = Threshold(value=float("inf"), method="none", low=0.0, high=1.0)
CALIBRATION_SET = "calibration.npz"  # the images the thresholds are chosen on, kept for recalibration


def thresholds_for(
    maps: np.ndarray, labels: np.ndarray, masks: np.ndarray, max_fpr: float | None, pixel_rows: int | None = None
) -> tuple[Threshold, Threshold]:
    """Export's rule: (image, pixel) thresholds from maps (M,H,W) of images with ``labels`` (M,) and
    ``masks`` (M,H,W). With a defective image: maximum F1 (or ``max_fpr``) on image scores and on the
    pixels of the masks; with good images only: the ``GOOD_QUANTILE`` of their scores and pixels. The pixel
    threshold uses the first ``pixel_rows`` images only (default all: those with known masks)."""
    scores = maps.reshape(len(maps), -1).max(axis=1)
    rows = len(maps) if pixel_rows is None else pixel_rows
    if labels.max(initial=0) == 1:
        image = choose_threshold(labels, scores, max_fpr=max_fpr)
    else:
        image = choose_threshold(np.zeros(len(scores)), scores)
    if masks[:rows].any():
        pixel = choose_threshold(masks[:rows], maps[:rows], max_fpr=max_fpr)
    else:
        pixel = choose_threshold(np.zeros(maps[:rows].size), maps[:rows].ravel())
    return image, pixel


def write_calibration_set(folder: Path, images: np.ndarray, labels: np.ndarray, masks: np.ndarray) -> None:
    """The calibration images (M,H,W,3) uint8, labels (M,) and masks (M,H,W) into ``folder/calibration.npz``."""
    np.savez_compressed(
        folder / CALIBRATION_SET,
        images=np.asarray(images, np.uint8),
        labels=np.asarray(labels, np.int8),
        masks=np.packbits(np.asarray(masks, bool), axis=-1),
    )


def read_calibration_set(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(images, labels, masks) that export kept in ``folder``, or None for a bundle without them."""
    path = folder / CALIBRATION_SET
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as kept:
        images, labels = kept["images"], kept["labels"].astype(np.int64)
        masks = np.unpackbits(kept["masks"], axis=-1, count=images.shape[2]).astype(np.uint8)
    return images, labels, masks


def export_bundle(
    model: nn.Module,
    data: CategoryData,
    out: str | os.PathLike,
    bank_fraction: BankFraction = 1.0,
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
    share of the patches, chosen by ``subsample`` (Patch SVDD; see ``models.patchsvdd.bank.memory_banks``);
    'auto' keeps the smallest k-center bank within ``AUTO_TOLERANCE`` AUROC of the full one on the labelled
    calibration images (``choose_bank``; the full bank without defective images to measure on).
    Besides the bundle's own files, keeps the images the thresholds were chosen on, with their labels and
    masks (``calibration.npz``): operator feedback chooses the thresholds again on them (``deploy.feedback``).
    """
    calibration = calibration if calibration is not None else data
    labelled = calibration.test_labels.size > 0 and calibration.test_labels.max() == 1
    fit, held = holdout_split(len(data.train_images), 0.0 if labelled else holdout_fraction)
    placeholder = _PLACEHOLDER
    family = family_of(model)
    bank_choice: list[dict] = []
    state = None
    if bank_fraction == "auto":
        keeps_bank = bool(family.site_state(model, data.train_images[fit][:1], data.mean, 1.0, subsample).banks)
        if labelled and keeps_bank:
            bank_fraction, bank_choice, state = choose_bank(
                model, data.train_images[fit], data.mean, calibration, search
            )
            subsample = "kcenter"
        else:
            bank_fraction = 1.0
    if isinstance(bank_fraction, str) or not 0 < bank_fraction <= 1:
        raise ValueError(f"bank fraction {bank_fraction!r}: a share in (0, 1] or 'auto'")
    if state is None:
        state = family.site_state(model, data.train_images[fit], data.mean, bank_fraction, subsample)
    bundle = Bundle(model, state, placeholder, placeholder, dict(info or {}))
    inspector = Inspector(bundle, device=str(next(model.parameters()).device), search=search)
    maps = inspector.maps(calibration.test_images)
    scores = maps.reshape(len(maps), -1).max(axis=1)
    if labelled:
        kept_images, kept_labels, kept_masks = calibration.test_images, calibration.test_labels, calibration.test_masks
        kept_maps = maps
        note = f"calibrated on {len(scores)} labelled images ({int(calibration.test_labels.sum())} defective)"
    else:  # every image here is good: held-out training images and the good calibration images set the bar
        kept_images = np.concatenate([data.train_images[held], calibration.test_images])
        kept_maps = np.concatenate([inspector.maps(data.train_images[held]), maps])
        kept_labels = np.zeros(len(kept_images), np.int64)
        kept_masks = np.zeros(kept_maps.shape, np.uint8)
        note = (
            f"no defective image to calibrate on: thresholds are the {GOOD_QUANTILE} quantile of the scores of "
            f"{len(kept_images)} good images ({len(held)} held out of the bank); check them on a few known defects"
        )
    image_threshold, pixel_threshold = thresholds_for(kept_maps, kept_labels, kept_masks, max_fpr)
    if labelled:
        note += f": {image_threshold.method}"
    bundle.image_threshold, bundle.pixel_threshold = image_threshold, pixel_threshold
    bundle.info.update(
        category=data.category,
        bank_fraction=bank_fraction,
        bank_subsample=subsample,
        calibration_note=note,
        n_train_in_bank=int(len(fit)),
        n_calibration=int(len(scores)),
        n_calibration_defective=int(calibration.test_labels.sum()) if labelled else 0,
        max_fpr=max_fpr,
    )
    write_bundle(bundle, out)
    write_calibration_set(Path(out), kept_images, kept_labels, kept_masks)
    types = calibration.defect_types or [GOOD if label == 0 else "defective" for label in calibration.test_labels]
    return inspector, Calibration(
        scores=scores,
        labels=calibration.test_labels,
        defects=per_defect(scores, types),
        note=note,
        bank_choice=bank_choice,
    )
