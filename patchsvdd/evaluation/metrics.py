"""Detection and segmentation AUROC (scikit-learn), AUPRO (MVTec AD) and per-defect statistics,
tolerant of single-class test sets."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from scipy import ndimage
from sklearn.metrics import auc, roc_auc_score

from patchsvdd.data.mvtec import GOOD
from patchsvdd.models.patchsvdd.scoring import FUSIONS


def metric_keys(fusions: Sequence[str]) -> tuple[str, ...]:
    """det_<f>, seg_<f> for each fusion f, in that order."""
    return tuple(f"{task}_{fusion}" for fusion in fusions for task in ("det", "seg"))


def aupro_keys(fusions: Sequence[str]) -> tuple[str, ...]:
    """aupro_<f> for each fusion f."""
    return tuple(f"aupro_{fusion}" for fusion in fusions)


METRIC_KEYS = metric_keys(FUSIONS)  # Patch SVDD's (the autoencoder's: metric_keys(autoencoder.FUSIONS))
AUPRO_KEYS = aupro_keys(FUSIONS)
PRO_MAX_FPR = 0.3  # the MVTec AD evaluation integrates the PRO curve up to this false-positive rate


class SingleClassWarning(UserWarning):
    """AUROC is undefined: the test set holds only good or only defective samples."""


def auroc(labels: np.ndarray, scores: np.ndarray, what: str = "AUROC") -> float | None:
    """Area under the ROC curve, or None (with a warning) when ``labels`` hold one class only."""
    labels = np.asarray(labels).ravel()
    if np.unique(labels).size < 2:
        warnings.warn(
            f"{what}: test set has only label {labels[:1].tolist()}; AUROC is undefined",
            SingleClassWarning,
            stacklevel=2,
        )
        return None
    return float(roc_auc_score(labels, np.asarray(scores, dtype=np.float64).ravel()))


def auroc_standard_error(value: float, n_normal: int, n_anomalous: int) -> float:
    """Standard error an AUROC of ``value`` has from its test set alone, ``n_normal`` good and ``n_anomalous``
    defective samples (Hanley and McNeil, 1982): the least a figure can move between draws of that many samples."""
    if n_normal < 1 or n_anomalous < 1 or not 0.0 <= value <= 1.0:
        raise ValueError(
            f"AUROC standard error needs 0 <= AUROC <= 1 and both classes, got {value}, "
            f"{n_normal} good, {n_anomalous} defective"
        )
    q1, q2 = value / (2 - value), 2 * value**2 / (1 + value)
    variance = value * (1 - value) + (n_anomalous - 1) * (q1 - value**2) + (n_normal - 1) * (q2 - value**2)
    return math.sqrt(max(variance, 0.0) / (n_normal * n_anomalous))


def defect_regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Label every 8-connected defect region of ``masks`` (M,H,W) 0/1 with its own number 1..R across
    all images (0: good pixels); returns the labels (M,H,W) int64 and R."""
    masks = np.asarray(masks).astype(bool)
    regions = np.zeros(masks.shape, dtype=np.int64)
    count = 0
    for i, mask in enumerate(masks):
        labelled, found = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
        regions[i] = np.where(labelled > 0, labelled + count, 0)
        count += found
    return regions, count


def aupro(masks: np.ndarray, maps: np.ndarray | torch.Tensor, max_fpr: float = PRO_MAX_FPR) -> float | None:
    """Area under the per-region-overlap (PRO) curve for FPR in [0, ``max_fpr``], divided by ``max_fpr``.

    As in the MVTec AD evaluation: at each threshold t, PRO(t) is the mean over
    all defect regions (8-connected components of ``masks`` (M,H,W)) of the
    fraction of the region's pixels whose score in ``maps`` (M,H,W) is >= t, and
    FPR(t) the fraction of all good pixels scoring >= t. Every distinct score is
    a threshold; the curve is closed at ``max_fpr`` by linear interpolation. None
    (with a warning) when there is no defect region or no good pixel.
    """
    scores = np.asarray(maps, dtype=np.float64).ravel()
    regions, count = defect_regions(masks)
    regions = regions.ravel()
    areas = np.bincount(regions, minlength=count + 1).astype(np.float64)
    if count == 0 or areas[0] == 0:
        warnings.warn(
            "AUPRO: the masks hold no defect region or no good pixel; AUPRO is undefined",
            SingleClassWarning,
            stacklevel=2,
        )
        return None
    order = np.argsort(-scores, kind="stable")
    ranked = regions[order]
    pro = np.cumsum(np.where(ranked > 0, 1.0 / (areas[ranked] * count), 0.0))
    fpr = np.cumsum((ranked == 0) / areas[0])
    distinct = np.append(scores[order][1:] != scores[order][:-1], True)  # last pixel of each threshold
    fpr = np.concatenate([[0.0], fpr[distinct]])
    pro = np.concatenate([[0.0], pro[distinct]])
    inside = int(np.searchsorted(fpr, max_fpr, side="right"))
    fpr_part, pro_part = fpr[:inside], pro[:inside]
    if inside < len(fpr) and fpr_part[-1] < max_fpr:
        step = (max_fpr - fpr_part[-1]) / (fpr[inside] - fpr_part[-1])
        fpr_part = np.append(fpr_part, max_fpr)
        pro_part = np.append(pro_part, pro[inside - 1] + step * (pro[inside] - pro[inside - 1]))
    return float(auc(fpr_part, pro_part) / max_fpr)


def category_metrics(
    maps: Mapping[str, torch.Tensor], labels: np.ndarray, masks: np.ndarray, with_aupro: bool = True
) -> dict[str, float | None]:
    """det_<f>, seg_<f> and (``with_aupro``) aupro_<f> for each fusion f of ``maps`` (each (M,H,W)).

    Detection uses the map maximum per image against ``labels`` (M,);
    segmentation uses every pixel against ``masks`` (M,H,W) of 0/1; AUPRO as in ``aupro``.
    """
    out: dict[str, float | None] = {}
    for fusion, amap in maps.items():
        scores = amap.flatten(1).amax(dim=1).numpy()
        out[f"det_{fusion}"] = auroc(labels, scores, f"detection AUROC ({fusion})")
        out[f"seg_{fusion}"] = auroc(masks, amap.numpy(), f"segmentation AUROC ({fusion})")
    if with_aupro:
        for fusion, amap in maps.items():
            out[f"aupro_{fusion}"] = aupro(masks, amap.numpy())
    return out


def per_defect(
    scores: np.ndarray, defect_types: Sequence[str], names: Sequence[str] | None = None
) -> dict[str, dict[str, float | int | None]]:
    """Image-score statistics per defect type and for 'good': n, mean, std, min, max, and for each
    defect type its detection AUROC against the good images ('auroc'; None without good images).

    scores (M,) image scores; defect_types M names, 'good' for defect-free images. ``names``: report
    exactly these types (a type with no image gets n 0 and None), e.g. the union over all envoys.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    types = np.asarray(list(defect_types))
    if len(types) != len(scores):
        raise ValueError(f"{len(scores)} scores but {len(types)} defect types")
    good = scores[types == GOOD]
    out: dict[str, dict[str, float | int | None]] = {}
    wanted = set(types.tolist()) if names is None else set(names)
    for name in [GOOD, *sorted(wanted - {GOOD})]:
        chosen = scores[types == name]
        if chosen.size == 0 and names is None:
            continue
        row: dict[str, float | int | None] = {
            "n": int(chosen.size),
            "mean": None,
            "std": None,
            "min": None,
            "max": None,
        }
        if chosen.size:
            row.update(
                mean=float(chosen.mean()), std=float(chosen.std()), min=float(chosen.min()), max=float(chosen.max())
            )
        if name != GOOD:
            row["auroc"] = (
                float(roc_auc_score(np.r_[np.zeros(good.size), np.ones(chosen.size)], np.r_[good, chosen]))
                if good.size and chosen.size
                else None
            )
        out[name] = row
    return out


DEFECT_PREFIX = "defect/"


def flatten_defects(table: Mapping[str, Mapping[str, float | int | None]]) -> dict[str, float]:
    """``per_defect``'s table as flat scalar metrics 'defect/<type>/<stat>' (None as NaN): what a
    federated task can report. Inverse: ``split_defects``."""
    return {
        f"{DEFECT_PREFIX}{name}/{stat}": math.nan if value is None else float(value)
        for name, row in table.items()
        for stat, value in row.items()
    }


def split_defects(metrics: Mapping[str, float]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """(the other metrics, the per-defect table) from flat metrics that ``flatten_defects`` made."""
    plain: dict[str, float] = {}
    table: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        if key.startswith(DEFECT_PREFIX):
            name, stat = key[len(DEFECT_PREFIX) :].rsplit("/", 1)
            table.setdefault(name, {})[stat] = value
        else:
            plain[key] = value
    if GOOD in table:  # good first, as per_defect orders it
        table = {GOOD: table.pop(GOOD), **dict(sorted(table.items()))}
    return plain, table
