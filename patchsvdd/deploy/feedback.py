"""Operator feedback that teaches a site's bundle, without training and without data leaving the site.

* **good** (a false alarm): the images' patch embeddings join the memory banks
  (``ModelFamily.add_good``; nothing the bank held is dropped); each such image
  then finds its own patches in the bank and scores far below the threshold.
* **defective** (a miss, or a defect to keep): the image is kept in the bundle
  (``feedback/defective-*.png``) for calibration only.

After either, the thresholds are chosen again by export's rule (maximum F1, or
``max_fpr`` when export had one; ``export.thresholds_for``) on the images the
site has labelled: export's calibration images (``calibration.npz``) and every
kept defective image, all scored with the new version's bank.

Each change is a new bundle version (``deploy.versions``): atomic, recorded in
``bundle.json`` with the request it came from, and undone by ``rollback``.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from patchsvdd.deploy.bundle import read_bundle
from patchsvdd.deploy.calibration import Threshold
from patchsvdd.deploy.export import CALIBRATION_SET, read_calibration_set, thresholds_for
from patchsvdd.deploy.inspector import Inspector
from patchsvdd.deploy.versions import write_version
from patchsvdd.errors import InputError

GOOD = "good"
DEFECTIVE = "defective"
LABELS = (GOOD, DEFECTIVE)
FEEDBACK_DIR = "feedback"


@dataclass
class Change:
    """What one piece of feedback did: the new ``version``, its ``label``, how many ``images``, the image
    threshold after it, the bank rows {K: rows} and a sentence."""

    version: int
    label: str
    images: int
    threshold: Threshold
    bank_rows: dict[str, int]
    note: str


def image_digest(image: np.ndarray) -> str:
    """First 16 hex digits of the SHA-256 of a uint8 image (H,W,3): names a kept image, finds a repeat."""
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()[:16]


def _replace_array(path: Path, array: np.ndarray) -> None:
    path.unlink(missing_ok=True)  # it may be a link to the previous version's file: never write through it
    np.save(path, array, allow_pickle=False)


def recalibrate(
    folder: Path, inspector: Inspector, max_fpr: float | None, confirmed_good: set[str]
) -> tuple[Threshold, Threshold, str]:
    """Export's rule again (``export.thresholds_for``), on what the version in ``folder`` keeps: export's
    calibration images (``calibration.npz``) and the kept defective images, all scored by ``inspector``
    now. The operator's word wins: a calibration image confirmed good (its digest in ``confirmed_good``)
    is in the bank now and leaves the calibration set; one confirmed defective counts as defective. The
    kept defective images have no mask: they count for the image threshold only."""
    kept = read_calibration_set(folder)
    if kept is None:
        raise InputError(
            f"{folder}: no {CALIBRATION_SET} (written before export kept its calibration images): export the "
            "bundle again to let feedback recalibrate it"
        )
    images, labels, masks = kept
    digests = [image_digest(image) for image in images]
    stay = np.array([d not in confirmed_good for d in digests], dtype=bool)
    images, labels, masks, digests = images[stay], labels[stay], masks[stay], [d for d, s in zip(digests, stay) if s]
    defective = sorted((folder / FEEDBACK_DIR).glob(f"{DEFECTIVE}-*.png"))
    known = {d: i for i, d in enumerate(digests)}
    extra = []
    for path in defective:
        index = known.get(path.stem.removeprefix(f"{DEFECTIVE}-"))
        if index is not None:
            labels[index] = 1  # a calibration image the operator says is defective
        else:
            extra.append(np.asarray(Image.open(path).convert("RGB"), dtype=np.uint8))
    n_masked = len(images)
    if extra:
        images = np.concatenate([images, np.stack(extra)])
        labels = np.concatenate([labels, np.ones(len(extra), np.int64)])
        masks = np.concatenate([masks, np.zeros((len(extra), *masks.shape[1:]), np.uint8)])
    if not len(images):
        raise InputError(f"{folder}: every calibration image was confirmed good: nothing is left to calibrate on")
    maps = inspector.maps(images)
    image, pixel = thresholds_for(maps, labels, masks, max_fpr, pixel_rows=n_masked)
    note = (
        f"recalibrated on {len(images)} images ({int(labels.sum())} defective, {len(defective)} of them from "
        f"operator feedback): {image.method}"
    )
    return image, pixel, note


def teach(
    bundle_path: str | os.PathLike,
    images: np.ndarray,
    label: str,
    request: str = "",
    device: str = "cpu",
) -> Change:
    """Teach the bundle at ``bundle_path`` that ``images`` (M,256,256,3) uint8 are ``label`` ('good' or
    'defective'); writes and switches to a new version. ``request`` names where the feedback came from."""
    if label not in LABELS:
        raise InputError(f"label {label!r}: choose {' or '.join(LABELS)}")
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != (256, 256, 3) or images.dtype != np.uint8 or not len(images):
        raise InputError(f"images of shape {images.shape} and dtype {images.dtype}: expected (M,256,256,3) uint8")
    bundle = read_bundle(bundle_path)
    family, info = bundle.family, bundle.info
    n_images = int(info.get("n_train_in_bank", 0))
    digests = [image_digest(image) for image in images]
    result: dict[str, Any] = {}

    def write(staging: Path, new_info: dict[str, Any]) -> None:
        if label == GOOD:
            try:
                state = family.add_good(
                    bundle.model,
                    bundle.state,
                    images,
                    n_images,
                    float(info.get("bank_fraction", 1.0)),
                    str(info.get("bank_subsample", "kcenter")),
                )
            except ValueError as exc:
                raise InputError(f"{bundle_path}: {exc}") from exc
            for k, bank in state.banks.items():
                _replace_array(staging / f"bank_{k}.npy", bank.astype(np.float32))
            bundle.state = state
            new_info["n_train_in_bank"] = n_images + len(images)
            new_info["n_confirmed_good"] = int(info.get("n_confirmed_good", 0)) + len(images)
            new_info["confirmed_good"] = sorted({*info.get("confirmed_good", []), *digests})
            new_info["bank_rows"] = {str(k): int(len(bank)) for k, bank in state.banks.items()}
            what = f"{len(images)} good image(s) added to the memory banks ({new_info['bank_rows']} rows)"
        else:
            (staging / FEEDBACK_DIR).mkdir(exist_ok=True)
            for image, name in zip(images, digests, strict=True):
                buffer = io.BytesIO()
                Image.fromarray(image).save(buffer, format="PNG")
                (staging / FEEDBACK_DIR / f"{DEFECTIVE}-{name}.png").write_bytes(buffer.getvalue())
            new_info["n_confirmed_defective"] = len(list((staging / FEEDBACK_DIR).glob(f"{DEFECTIVE}-*.png")))
            what = f"{len(images)} defective image(s) kept for calibration"
        max_fpr = info.get("max_fpr")
        threshold, pixel, calibration_note = recalibrate(
            staging,
            Inspector(bundle, device=device),
            None if max_fpr is None else float(max_fpr),
            set(new_info.get("confirmed_good", [])),
        )
        new_info["image_threshold"], new_info["pixel_threshold"] = threshold.to_json(), pixel.to_json()
        new_info["calibration_note"] = calibration_note
        note = (
            f"{what}; image threshold {bundle.image_threshold.value:.4g} -> {threshold.value:.4g} ({threshold.method})"
        )
        new_info["written"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        result.update(threshold=threshold, note=note, bank_rows=dict(new_info.get("bank_rows", {})))
        change["note"] = note  # write_version adds ``change`` to the history after this returns

    change: dict[str, Any] = {
        "change": f"{label} feedback",
        "label": label,
        "images": digests,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "request": request,
    }
    folder = write_version(bundle_path, change, write)
    version = int(folder.name)
    return Change(version, label, len(images), result["threshold"], result["bank_rows"], result["note"])
