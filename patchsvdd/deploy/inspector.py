"""Inspecting new images with a site bundle: score, normalised score, decision and anomaly map.

``load_bundle(path)`` reads a bundle (see ``patchsvdd.deploy.bundle``) once and builds
what its model scores with (Patch SVDD: the nearest-neighbour index of each
memory bank); ``Inspector.inspect(image)`` then answers for one image.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from patchsvdd.data.images import as_model_image, read_image
from patchsvdd.deploy.bundle import Bundle, read_bundle
from patchsvdd.deploy.calibration import Threshold
from patchsvdd.device import resolve_device
from patchsvdd.models.base import BankSearch


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
    """Scores images with one site's bundle; built by ``load_bundle`` or ``Inspector(bundle)``."""

    def __init__(self, bundle: Bundle, device: str | torch.device = "auto", search: BankSearch = "auto") -> None:
        self.bundle = bundle
        self.device = resolve_device(str(device))
        self.model = bundle.model.to(self.device).eval()
        self.scorer = bundle.family.site_scorer(self.model, bundle.state, search)

    @property
    def search(self) -> str:
        """How it searches: 'exact' or 'fast' (Patch SVDD's banks), 'none' for a model without banks."""
        return self.scorer.search

    @property
    def image_threshold(self) -> Threshold:
        return self.bundle.image_threshold

    @property
    def pixel_threshold(self) -> Threshold:
        return self.bundle.pixel_threshold

    def maps(self, images: np.ndarray) -> np.ndarray:
        """Anomaly maps (N,256,256) float32 (sum fusion) of uint8 images (N,256,256,3)."""
        return self.scorer.maps(images)

    def inspect(self, image: np.ndarray | Image.Image | str | os.PathLike) -> Result:
        """Score one image (a path, a PIL image or a uint8 array of any size, RGB or grayscale)."""
        amap = self.maps(to_image(image)[None])[0]
        score = float(amap.max())
        return Result(
            score=score,
            normalized_score=float(self.image_threshold.normalise(score)),
            anomalous=bool(score >= self.image_threshold.value),
            map=amap,
        )


def load_bundle(path: str | os.PathLike, device: str = "auto", search: BankSearch = "auto") -> Inspector:
    """An ``Inspector`` for the bundle folder ``path`` (read once; BundleError names a bad file)."""
    return Inspector(read_bundle(path), device=device, search=search)
