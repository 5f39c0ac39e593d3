"""Decoding one image or mask file as the model reads it (numpy and Pillow only, no torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from patchsvdd.errors import MVTecDataError

IMAGE_SIZE = 256
MASK_THRESHOLD = 128


def as_model_image(img: Image.Image, size: int = IMAGE_SIZE) -> np.ndarray:
    """A PIL image as the model reads it: RGB (grayscale repeated to 3 channels) resized bicubic, uint8
    (size,size,3)."""
    img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def read_image(path: Path, size: int = IMAGE_SIZE) -> np.ndarray:
    """The image file at ``path`` as ``as_model_image`` gives it: uint8 (size,size,3)."""
    try:
        with Image.open(path) as img:
            return as_model_image(img, size)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise MVTecDataError(f"{path}: cannot decode image ({exc})") from exc


def read_mask(path: Path | None, size: int = IMAGE_SIZE) -> np.ndarray:
    """Binary mask resized nearest and binarised at 128: uint8 (size,size) of 0/1; zeros for None."""
    if path is None:
        return np.zeros((size, size), dtype=np.uint8)
    try:
        with Image.open(path) as opened:
            mask = opened.convert("L")
            if mask.size != (size, size):
                mask = mask.resize((size, size), Image.Resampling.NEAREST)
            return (np.asarray(mask) >= MASK_THRESHOLD).astype(np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise MVTecDataError(f"{path}: cannot decode mask ({exc})") from exc


def is_grayscale(images: np.ndarray) -> bool:
    """Whether uint8 images (N,H,W,3) hold gray pixels only (the reader repeats a grayscale channel)."""
    return bool(np.array_equal(images[..., 0], images[..., 1]) and np.array_equal(images[..., 0], images[..., 2]))
