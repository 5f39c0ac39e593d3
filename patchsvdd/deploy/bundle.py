"""Site bundles: what one site needs to inspect new images, as plain files.

A bundle is a folder: ``model.pt`` (a project checkpoint: tensors and plain
metadata, read with ``weights_only=True``) and ``bundle.json`` (model, category,
image size, thresholds, where the model came from, when, version). A Patch SVDD
bundle adds ``mean.npy`` (the site's training mean, (256,256,3) float32) and
``bank_64.npy`` / ``bank_32.npy`` (training patch embeddings (P,D) float32, all
or a subsample); an autoencoder bundle needs no bank, only the scales of its two
errors on the site's good images (in ``bundle.json``). Export also keeps the
calibration images with their labels and masks (``calibration.npz``), which
operator feedback recalibrates on (``deploy.feedback``).
Operator feedback makes new versions of a bundle in ``versions/NNNN`` (``deploy.versions``); reading a
bundle reads the version its ``CURRENT`` file names, else the folder itself.
Reading one never unpickles code (``numpy.load(allow_pickle=False)``).
The memory bank and the mean are the site's data: a bundle stays at its site.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patchsvdd import __version__
from patchsvdd.data.images import IMAGE_SIZE
from patchsvdd.deploy.calibration import Threshold
from patchsvdd.deploy.versions import current_folder
from patchsvdd.errors import InputError
from patchsvdd.models.base import ModelFamily, SiteState
from patchsvdd.models.registry import family_of
from patchsvdd.training.checkpoint import load_checkpoint, save_checkpoint

BUNDLE_FORMAT = 1
INFO_FILE = "bundle.json"


class BundleError(InputError):
    """A bundle folder that cannot be read; the message names the file and what is wrong."""


@dataclass
class Bundle:
    """A site's inspector in memory: the model, what it keeps of the site's good images (``state``: Patch
    SVDD's training mean (H,W,3) and banks {64: (P,D), 32: (P,D)}; the autoencoder's error scales), the
    thresholds and ``info`` (what ``bundle.json`` says of it)."""

    model: torch.nn.Module
    state: SiteState
    image_threshold: Threshold
    pixel_threshold: Threshold
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> ModelFamily:
        return family_of(self.model)

    @property
    def kind(self) -> str:
        """The model's registry name ('patchsvdd', 'autoencoder', ...)."""
        return self.family.name

    @property
    def mean(self) -> np.ndarray | None:
        return self.state.mean

    @property
    def banks(self) -> dict[int, np.ndarray]:
        return self.state.banks

    @property
    def scales(self) -> dict[str, float] | None:
        return self.state.scales


def write_bundle(bundle: Bundle, path: str | os.PathLike) -> Path:
    """Write ``bundle`` into the folder ``path`` (created; files replaced)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_checkpoint(bundle.model, path / "model.pt", category=bundle.info.get("category", ""))
    if bundle.mean is not None:
        np.save(path / "mean.npy", bundle.mean.astype(np.float32), allow_pickle=False)
    for k, bank in bundle.banks.items():
        np.save(path / f"bank_{k}.npy", bank.astype(np.float32), allow_pickle=False)
    info = {
        **bundle.info,
        "format": BUNDLE_FORMAT,
        "version": __version__,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": bundle.kind,
        "image_size": IMAGE_SIZE,
        **bundle.family.state_fields(bundle.model, bundle.state),
        "bank_rows": {str(k): int(len(bank)) for k, bank in bundle.banks.items()},
        "image_threshold": bundle.image_threshold.to_json(),
        "pixel_threshold": bundle.pixel_threshold.to_json(),
    }
    (path / INFO_FILE).write_text(json.dumps(info, indent=2))
    return path


def _array_reader(folder: Path):
    def read(name: str) -> np.ndarray:
        path = folder / name
        if not path.is_file():
            raise BundleError(f"{path}: missing from the bundle")
        try:
            return np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise BundleError(f"{path}: not a plain numpy array ({exc})") from exc

    return read


def read_bundle(path: str | os.PathLike) -> Bundle:
    """The bundle in folder ``path`` (its current version, see ``deploy.versions``); BundleError naming the
    file when something is missing or wrong."""
    path = current_folder(path)
    info_file = path / INFO_FILE
    if not info_file.is_file():
        raise BundleError(f"{info_file}: not found (is {path} a bundle folder written by 'patchsvdd export'?)")
    try:
        info = json.loads(info_file.read_text())
        image_threshold = Threshold(**info["image_threshold"])
        pixel_threshold = Threshold(**info["pixel_threshold"])
    except (ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"{info_file}: unreadable ({type(exc).__name__}: {exc})") from exc
    if info.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{info_file}: bundle format {info.get('format')!r}, this version reads {BUNDLE_FORMAT}")
    model, _ = load_checkpoint(path / "model.pt")
    family = family_of(model)
    if family.name != info.get("model", "patchsvdd"):
        raise BundleError(f"{path / 'model.pt'}: holds a {family.name} model, {info_file} says {info.get('model')!r}")
    try:
        state = family.read_state(model, info, _array_reader(path))
    except ValueError as exc:  # the family names the file: 'mean.npy: shape ...'
        raise BundleError(f"{path}/{exc}") from exc
    return Bundle(model, state, image_threshold, pixel_threshold, info)


def bundle_bytes(path: str | os.PathLike) -> int:
    """Size of a bundle folder on disk in bytes."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
