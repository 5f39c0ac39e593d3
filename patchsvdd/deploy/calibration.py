"""Decision thresholds from scores: at maximum F1, at a target false-positive rate, or from good images only.

numpy and scikit-learn only. Used when a site bundle is exported
(``patchsvdd export``); the chosen point is what ``Inspector`` decides with.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from sklearn.metrics import precision_recall_curve, roc_curve

from patchsvdd.errors import InputError

GOOD_QUANTILE = 0.99  # without defective images: this quantile of held-out good scores (the max of a few images)


@dataclass(frozen=True)
class Threshold:
    """A decision threshold on scores: ``anomalous = score >= value``.

    ``method``: 'max_f1', 'max_fpr' or 'good_quantile'; ``fpr``/``tpr``/``f1`` at
    that point where labelled data allowed them (None otherwise); ``low``/``high``:
    the score range used to normalise (see ``normalise``).
    """

    value: float
    method: str
    low: float
    high: float
    fpr: float | None = None
    tpr: float | None = None
    f1: float | None = None

    def to_json(self) -> dict:
        return asdict(self)

    def normalise(self, scores: np.ndarray | float) -> np.ndarray:
        """Scores mapped to [0, 1] with the threshold at 0.5: linear on each side, clipped."""
        scores = np.asarray(scores, dtype=np.float64)
        below = 0.5 * (scores - self.low) / max(self.value - self.low, 1e-12)
        above = 0.5 + 0.5 * (scores - self.value) / max(self.high - self.value, 1e-12)
        return np.clip(np.where(scores < self.value, below, above), 0.0, 1.0)


def _rates(labels: np.ndarray, scores: np.ndarray, value: float) -> tuple[float, float, float]:
    predicted = scores >= value
    tp = float((predicted & (labels == 1)).sum())
    fp = float((predicted & (labels == 0)).sum())
    fn = float((~predicted & (labels == 1)).sum())
    fpr = fp / max((labels == 0).sum(), 1)
    tpr = tp / max((labels == 1).sum(), 1)
    f1 = 2 * tp / max(2 * tp + fp + fn, 1)
    return fpr, tpr, f1


def choose_threshold(
    labels: np.ndarray,
    scores: np.ndarray,
    max_fpr: float | None = None,
    good_scores: np.ndarray | None = None,
    quantile: float = GOOD_QUANTILE,
) -> Threshold:
    """The threshold for ``scores`` (M,) with ``labels`` (M,) 0 good / 1 defective (pixels or images).

    Both classes present: at maximum F1, or with ``max_fpr`` the lowest threshold
    whose false-positive rate on the good ones is at most ``max_fpr``. Only good
    labels (no defect to calibrate on): the ``quantile`` of ``good_scores`` (held-out
    good images never in the memory bank; else ``scores``) — never a threshold that
    flags every good image.
    """
    labels = np.asarray(labels).ravel().astype(np.int64)
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape or scores.size == 0:
        raise InputError(f"{scores.size} scores for {labels.size} labels: need the same, non-zero number")
    low, high = float(scores.min()), float(scores.max())
    if labels.min() == labels.max():
        if labels[0] == 1:
            raise InputError("only defective samples: a threshold needs good ones (their scores set the false alarms)")
        reference = scores if good_scores is None or len(good_scores) == 0 else np.asarray(good_scores, np.float64)
        value = float(np.quantile(reference, quantile))
        fpr, _, _ = _rates(labels, scores, value)
        return Threshold(
            value,
            "good_quantile",
            min(low, float(reference.min())),
            max(high, value * 1.5 if value > 0 else 1.0),
            fpr=fpr,
        )
    if max_fpr is not None:
        if not 0 <= max_fpr < 1:
            raise InputError(f"max_fpr {max_fpr}: must be in [0, 1)")
        fprs, _, thresholds = roc_curve(labels, scores)
        allowed = np.nonzero(fprs <= max_fpr)[0]
        value = float(min(thresholds[allowed[-1]], high + 1e-9)) if allowed.size else high + 1e-9
        method = "max_fpr"
    else:
        precision, recall, thresholds = precision_recall_curve(labels, scores)
        f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
        value = float(thresholds[int(np.argmax(f1))])
        method = "max_f1"
    fpr, tpr, f1_at = _rates(labels, scores, value)
    return Threshold(value, method, low, high, fpr=fpr, tpr=tpr, f1=f1_at)
