"""Inspecting new images with a site bundle: score, normalised score, decision and anomaly map.

``load_bundle(path)`` reads a bundle (see ``patchsvdd.deploy.bundle``) once and builds
the nearest-neighbour index of each memory bank; ``Inspector.inspect(image)``
then answers for one image. ``export_bundle`` makes a bundle at a site from a
model and the site's own images, and calibrates its thresholds there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from patchsvdd.models.autoencoder.network import ConvAutoencoder, good_scales, image_maps
from patchsvdd.deploy.bundle import Bundle, memory_banks, read_bundle, write_bundle
from patchsvdd.deploy.calibration import GOOD_QUANTILE, Threshold, choose_threshold
from patchsvdd.data.mvtec import GOOD, CategoryData, holdout_split, standardise
from patchsvdd.data.images import IMAGE_SIZE, as_model_image, read_image
from patchsvdd.device import resolve_device
from patchsvdd.evaluation.metrics import per_defect
from patchsvdd.models.patchsvdd.network import LARGE_PATCH, SMALL_PATCH, PatchSVDD
from patchsvdd.models.patchsvdd.scoring import RERANK, _rerank, distribute_scores

BankSearch = Literal["auto", "exact", "fast"]
FAST_BANK_ROWS = 20_000  # 'auto': banks larger than this are searched with an HNSW graph


class MemoryBank:
    """Training patch embeddings (P,D) of one K with a faiss index built once; ``distances`` answers queries.

    Embeddings are centred on the bank mean and the candidates re-ranked by
    direct differences, as in ``scoring.exact_nearest``: exact with ``exact``,
    an HNSW graph (M=16, efSearch 64) with ``fast``.
    """

    def __init__(self, bank: np.ndarray, search: BankSearch = "auto") -> None:
        import faiss

        self.mean = bank.astype(np.float64).mean(axis=0)
        self.bank = torch.from_numpy((bank - self.mean).astype(np.float32))
        fast = search == "fast" or (search == "auto" and len(bank) > FAST_BANK_ROWS)
        dim = bank.shape[1]
        if fast:
            self.index = faiss.IndexHNSWFlat(dim, 16)
            self.index.hnsw.efConstruction = 40
        else:
            self.index = faiss.IndexFlatL2(dim)
        self.index.add(np.ascontiguousarray(self.bank.numpy()))
        if fast:
            self.index.hnsw.efSearch = 64
        self.search = "fast" if fast else "exact"

    def distances(self, queries: np.ndarray) -> torch.Tensor:
        """L2 distance (Q,) from each query (Q,D) to its nearest bank row (as found by the index)."""
        centred = torch.from_numpy((queries.astype(np.float64) - self.mean).astype(np.float32))
        _, found = self.index.search(np.ascontiguousarray(centred.numpy()), min(RERANK, len(self.bank)))
        return _rerank(centred, self.bank, torch.from_numpy(found.astype(np.int64)))


@dataclass
class Result:
    """One image's answer: raw ``score`` (map maximum), ``normalized_score`` in [0, 1] (0.5 at the threshold),
    ``anomalous`` (score >= image threshold) and ``map`` (256,256) float32 of per-pixel scores (sum fusion)."""

    score: float
    normalized_score: float
    anomalous: bool
    map: np.ndarray


def to_image(image: np.ndarray | Image.Image | str | os.PathLike) -> np.ndarray:
    """An image as the model reads it: uint8 (256,256,3), RGB (grayscale repeated), resized bicubic.
    Takes a path, a PIL image, or an array (H,W), (H,W,1), (H,W,3) or (H,W,4) of uint8."""
    if isinstance(image, (str, os.PathLike)):
        return read_image(Path(image))
    if isinstance(image, np.ndarray):
        array = image
        if array.dtype != np.uint8:
            raise ValueError(f"image array of dtype {array.dtype}: expected uint8")
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
            raise ValueError(f"image array of shape {array.shape}: expected (H,W), (H,W,1), (H,W,3) or (H,W,4)")
        image = Image.fromarray(array)
    return as_model_image(image)


class Inspector:
    """Scores images against one site's memory banks; built by ``load_bundle`` or ``Inspector(bundle)``."""

    def __init__(self, bundle: Bundle, device: str | torch.device = "auto", search: BankSearch = "auto") -> None:
        self.bundle = bundle
        self.device = resolve_device(str(device))
        self.model = bundle.model.to(self.device).eval()
        self.banks = {k: MemoryBank(bank, search) for k, bank in bundle.banks.items()}

    @property
    def image_threshold(self) -> Threshold:
        return self.bundle.image_threshold

    @property
    def pixel_threshold(self) -> Threshold:
        return self.bundle.pixel_threshold

    @torch.no_grad()
    def maps(self, images: np.ndarray, batch_size: int = 8) -> np.ndarray:
        """Anomaly maps (N,256,256) float32 (sum fusion) of uint8 images (N,256,256,3)."""
        if self.bundle.kind == "autoencoder":
            return image_maps(self.model, images, self.bundle.scales, batch_size)["sum"].numpy().astype(np.float32)
        out = []
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(standardise(images[start : start + batch_size], self.bundle.mean)).to(self.device)
            emb64, emb32 = self.model.embed(batch)
            fused = None
            for k, emb in ((LARGE_PATCH, emb64), (SMALL_PATCH, emb32)):
                n, d, g, _ = emb.shape
                queries = emb.permute(0, 2, 3, 1).reshape(-1, d).float().cpu().numpy()
                scores = self.banks[k].distances(queries).reshape(n, g, g)
                amap = distribute_scores(scores, k, PatchSVDD.strides[k])
                fused = amap if fused is None else fused + amap
            out.append(fused.numpy().astype(np.float32))
        return np.concatenate(out) if out else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), np.float32)

    def inspect(self, image: np.ndarray | Image.Image | str | os.PathLike) -> Result:
        """Score one image (a path, a PIL image or a uint8 array of any size, RGB or grayscale)."""
        amap = self.maps(to_image(image)[None])[0]
        score = float(amap.max())
        return Result(score=score, normalized_score=float(self.image_threshold.normalise(score)),
                      anomalous=bool(score >= self.image_threshold.value), map=amap)


def load_bundle(path: str | os.PathLike, device: str = "auto", search: BankSearch = "auto") -> Inspector:
    """An ``Inspector`` for the bundle folder ``path`` (read once; BundleError names a bad file)."""
    return Inspector(read_bundle(path), device=device, search=search)


@dataclass
class Calibration:
    """What export measured on the calibration images: image scores (M,), maps (M,H,W), and the table
    of scores per defect type."""

    scores: np.ndarray
    labels: np.ndarray
    defects: dict
    note: str


def export_bundle(
    model: PatchSVDD | ConvAutoencoder, data: CategoryData, out: str | os.PathLike, bank_fraction: float = 1.0,
    max_fpr: float | None = None, calibration: CategoryData | None = None, info: dict | None = None,
    search: BankSearch = "auto", holdout_fraction: float = 0.1, subsample: str = "kcenter",
) -> tuple[Inspector, Calibration]:
    """Build and write a site bundle from ``model`` and the site's ``data`` (its training images make
    Patch SVDD's memory banks and mean, or the autoencoder's error scales); calibrate the thresholds on ``calibration`` (default: ``data``'s test split).

    With defective calibration images: image threshold at maximum F1 (or at ``max_fpr`` on good images),
    pixel threshold the same on the masks. Without: ``holdout_fraction`` of the training images stay out
    of the banks and a high quantile of good scores is the threshold. ``bank_fraction`` < 1 keeps that
    share of the patches, chosen by ``subsample`` (see ``bundle.memory_banks``).
    """
    calibration = calibration if calibration is not None else data
    labelled = calibration.test_labels.size > 0 and calibration.test_labels.max() == 1
    fit, held = holdout_split(len(data.train_images), 0.0 if labelled else holdout_fraction)
    placeholder = Threshold(value=float("inf"), method="none", low=0.0, high=1.0)
    if isinstance(model, ConvAutoencoder):  # no bank: the good images only set the scale of each error
        scales = good_scales(model.eval(), data.train_images[fit])
        bundle = Bundle(model, None, {}, placeholder, placeholder, dict(info or {}), scales=scales)
    else:
        mean = data.mean
        banks = memory_banks(model.eval(), standardise(data.train_images[fit], mean), bank_fraction, subsample)
        bundle = Bundle(model, mean, banks, placeholder, placeholder, dict(info or {}))
    inspector = Inspector(bundle, device=str(next(model.parameters()).device), search=search)
    maps = inspector.maps(calibration.test_images)
    scores = maps.reshape(len(maps), -1).max(axis=1)
    if labelled:
        image_threshold = choose_threshold(calibration.test_labels, scores, max_fpr=max_fpr)
        pixel_threshold = choose_threshold(calibration.test_masks, maps, max_fpr=max_fpr)
        note = (f"calibrated on {len(scores)} labelled images ({int(calibration.test_labels.sum())} defective): "
                f"{image_threshold.method}")
    else:  # every image here is good: held-out training images and the good calibration images set the bar
        held_maps = inspector.maps(data.train_images[held])
        pool_maps = np.concatenate([held_maps, maps])
        pool = pool_maps.reshape(len(pool_maps), -1).max(axis=1)
        image_threshold = choose_threshold(np.zeros(len(pool)), pool)
        pixel_threshold = choose_threshold(np.zeros(pool_maps.size), pool_maps.ravel())
        note = (f"no defective image to calibrate on: thresholds are the {GOOD_QUANTILE} quantile of the scores of "
                f"{len(pool)} good images ({len(held)} held out of the bank); check them on a few known defects")
    bundle.image_threshold, bundle.pixel_threshold = image_threshold, pixel_threshold
    bundle.info.update(category=data.category, bank_fraction=bank_fraction, bank_subsample=subsample, calibration_note=note,
                       n_train_in_bank=int(len(fit)), n_calibration=int(len(scores)))
    write_bundle(bundle, out)
    types = calibration.defect_types or [GOOD if label == 0 else "defective" for label in calibration.test_labels]
    return inspector, Calibration(scores=scores, labels=calibration.test_labels, defects=per_defect(scores, types), note=note)

