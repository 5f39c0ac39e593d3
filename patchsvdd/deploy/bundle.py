"""Site bundles: what one site needs to inspect new images, as plain files.

A bundle is a folder: ``model.pt`` (a project checkpoint: tensors and plain
metadata, read with ``weights_only=True``) and ``bundle.json`` (model, category,
image size, thresholds, where the model came from, when, version). A Patch SVDD
bundle adds ``mean.npy`` (the site's training mean, (256,256,3) float32) and
``bank_64.npy`` / ``bank_32.npy`` (training patch embeddings (P,D) float32, all
or a subsample); an autoencoder bundle needs no bank, only the scales of its two
errors on the site's good images (in ``bundle.json``).
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
from patchsvdd.deploy.calibration import Threshold
from patchsvdd.training.checkpoint import load_checkpoint, save_checkpoint
from patchsvdd.data.images import IMAGE_SIZE
from patchsvdd.errors import InputError
from patchsvdd.models.autoencoder.network import ConvAutoencoder
from patchsvdd.models.patchsvdd.network import LARGE_PATCH, SMALL_PATCH, PatchSVDD
from patchsvdd.models.registry import kind_of
from patchsvdd.models.patchsvdd.scoring import embed_images, flatten_grid

BUNDLE_FORMAT = 1
INFO_FILE = "bundle.json"


class BundleError(InputError):
    """A bundle folder that cannot be read; the message names the file and what is wrong."""


@dataclass
class Bundle:
    """A site's inspector in memory: model and thresholds; Patch SVDD: training mean (H,W,3) and banks
    {64: (P,D), 32: (P,D)}; the autoencoder: ``scales`` of its errors (see ``autoencoder.fuse``), mean None and
    no bank."""

    model: PatchSVDD | ConvAutoencoder
    mean: np.ndarray | None
    banks: dict[int, np.ndarray]
    image_threshold: Threshold
    pixel_threshold: Threshold
    info: dict[str, Any] = field(default_factory=dict)
    scales: dict[str, float] | None = None

    @property
    def kind(self) -> str:
        """'patchsvdd' or 'autoencoder'."""
        return kind_of(self.model)


SUBSAMPLES = ("kcenter", "random")


@torch.no_grad()
def kcenter_per_position(embeddings: torch.Tensor, keep: int) -> torch.Tensor:
    """A covering subsample of a grid of patch embeddings (N,D,H,W) -> (H*W*keep, D).

    At each of the H*W grid positions, greedy k-center over the N images'
    patches there: start from the patch farthest from their mean, then add the
    patch farthest from all chosen so far, ``keep`` times. Near-duplicates (the
    many ordinary patches) are dropped first and unusual good patches kept,
    which a random subsample does the other way round.
    """
    n, d, h, w = embeddings.shape
    keep = min(max(1, keep), n)
    patches = embeddings.permute(2, 3, 0, 1).reshape(h * w, n, d).float()  # (P,N,D)
    rows = torch.arange(h * w)
    chosen = torch.empty(h * w, keep, dtype=torch.long)
    chosen[:, 0] = (patches - patches.mean(dim=1, keepdim=True)).norm(dim=2).argmax(dim=1)
    nearest = (patches - patches[rows, chosen[:, 0]][:, None]).norm(dim=2)  # (P,N) distance to the chosen set
    for j in range(1, keep):
        chosen[:, j] = nearest.argmax(dim=1)
        nearest = torch.minimum(nearest, (patches - patches[rows, chosen[:, j]][:, None]).norm(dim=2))
    return patches[rows[:, None], chosen].reshape(-1, d)


def memory_banks(
    model: PatchSVDD, images: np.ndarray, fraction: float = 1.0, subsample: str = "kcenter", seed: int = 0
) -> dict[int, np.ndarray]:
    """Patch embeddings of standardised training images (N,3,H,W) for both K, flattened to (P,D); with
    ``fraction`` < 1 only about that share of the rows: 'kcenter' (``kcenter_per_position``, the default)
    or 'random' (rows drawn with ``seed``)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"bank fraction {fraction}: must be in (0, 1]")
    if subsample not in SUBSAMPLES:
        raise ValueError(f"subsample {subsample!r}: choose {' or '.join(SUBSAMPLES)}")
    emb64, emb32 = embed_images(model, images)
    rng = np.random.default_rng(seed)
    banks = {}
    for k, emb in ((LARGE_PATCH, emb64), (SMALL_PATCH, emb32)):
        if fraction == 1:
            rows = flatten_grid(emb).numpy()
        elif subsample == "kcenter":
            rows = kcenter_per_position(emb, round(fraction * emb.shape[0])).numpy()
        else:
            rows = flatten_grid(emb).numpy()
            rows = rows[np.sort(rng.choice(len(rows), size=max(1, round(fraction * len(rows))), replace=False))]
        banks[k] = np.ascontiguousarray(rows, dtype=np.float32)
    return banks


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
        **({"emb_dim": bundle.model.emb_dim} if bundle.kind == "patchsvdd" else {"scales": bundle.scales}),
        "bank_rows": {str(k): int(len(bank)) for k, bank in bundle.banks.items()},
        "image_threshold": bundle.image_threshold.to_json(),
        "pixel_threshold": bundle.pixel_threshold.to_json(),
    }
    (path / INFO_FILE).write_text(json.dumps(info, indent=2))
    return path


def _load_array(path: Path) -> np.ndarray:
    if not path.is_file():
        raise BundleError(f"{path}: missing from the bundle")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise BundleError(f"{path}: not a plain numpy array ({exc})") from exc


def read_bundle(path: str | os.PathLike) -> Bundle:
    """The bundle in folder ``path``; BundleError naming the file when something is missing or wrong."""
    path = Path(path)
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
    if kind_of(model) != info.get("model", "patchsvdd"):
        raise BundleError(f"{path / 'model.pt'}: holds a {kind_of(model)} model, {info_file} says {info.get('model')!r}")
    if kind_of(model) == "autoencoder":
        scales = info.get("scales")
        if not isinstance(scales, dict) or not all(isinstance(scales.get(n), (int, float)) and scales[n] > 0
                                                   for n in ("l2", "ssim")):
            raise BundleError(f"{info_file}: 'scales' {scales!r}: expected positive numbers 'l2' and 'ssim'")
        return Bundle(model, None, {}, image_threshold, pixel_threshold, info, scales=dict(scales))
    mean = _load_array(path / "mean.npy")
    if mean.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise BundleError(f"{path / 'mean.npy'}: shape {mean.shape}, expected {(IMAGE_SIZE, IMAGE_SIZE, 3)}")
    banks = {}
    for k in (LARGE_PATCH, SMALL_PATCH):
        bank = _load_array(path / f"bank_{k}.npy")
        if bank.ndim != 2 or bank.shape[1] != model.emb_dim or len(bank) == 0:
            raise BundleError(f"{path / f'bank_{k}.npy'}: shape {bank.shape}, expected (rows, {model.emb_dim})")
        banks[k] = bank.astype(np.float32)
    return Bundle(model, mean.astype(np.float32), banks, image_threshold, pixel_threshold, info)


def bundle_bytes(path: str | os.PathLike) -> int:
    """Size of a bundle folder on disk in bytes."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())

