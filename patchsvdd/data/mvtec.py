"""MVTec AD reader: a validated index of one category, shards, loading and standardisation (one image
file is decoded by ``images``).

numpy and Pillow only (no torch), so that an envoy's shard descriptor can use it.

Layout: ``<root>/<category>/train/good/*.png``, ``<root>/<category>/test/<defect|good>/*.png``,
``<root>/<category>/ground_truth/<defect>/<name>_mask.png``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from patchsvdd.data.images import IMAGE_SIZE, read_image, read_mask
from patchsvdd.errors import MVTecDataError

GOOD = "good"
DEFECT_TYPES_LABEL = "defect types:"  # an envoy's shard description lists its defect types after this
BUNDLE_FOLDER_LABEL = "bundle folder:"  # ... and where its site bundles go (patchsvdd.federated reads both)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MASK_SUFFIX = "_mask"


@dataclass(frozen=True)
class TestSample:
    """One test image: label 0 for good, 1 for any defect; ``mask`` is None for good images."""

    image: Path
    defect_type: str
    mask: Path | None

    @property
    def label(self) -> int:
        return int(self.defect_type != GOOD)


@dataclass(frozen=True)
class CategoryIndex:
    """Files of one category, checked once: training images, test samples with their masks."""

    root: Path
    category: str
    train: tuple[Path, ...]
    test: tuple[TestSample, ...]

    @property
    def path(self) -> Path:
        return self.root / self.category

    @property
    def defect_types(self) -> list[str]:
        return sorted({s.defect_type for s in self.test if s.defect_type != GOOD})

    def shard(self, rank: int, world_size: int) -> CategoryIndex:
        """Shard ``rank`` (1-based, as OpenFL's ``rank_worldsize``) of ``world_size``.

        Every ``world_size``-th file, so shards do not overlap, cover everything
        and each holds every defect type where there are enough images.
        """
        if world_size < 1 or not 1 <= rank <= world_size:
            raise MVTecDataError(f"rank_worldsize {rank},{world_size}: rank must be in 1..world_size")
        train = self.train[rank - 1 :: world_size]
        if not train:
            raise MVTecDataError(
                f"{self.path / 'train' / GOOD}: {len(self.train)} training images cannot fill shard {rank} "
                f"of {world_size}"
            )
        return replace(self, train=train, test=self.test[rank - 1 :: world_size])


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header; raises MVTecDataError for a file that is no image."""
    try:
        with Image.open(path) as img:
            return img.size
    except (UnidentifiedImageError, OSError) as exc:
        raise MVTecDataError(f"{path}: not a readable image ({exc})") from exc


def index_category(root: str | os.PathLike, category: str) -> CategoryIndex:
    """Build and check the index of ``<root>/<category>``.

    Raises MVTecDataError, naming the path, for: a missing root or category,
    no or an empty ``train/good``, no ``test``, a file that is not an image, a
    defect image without its mask, a mask whose size differs from its image,
    or a mask with no test image.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise MVTecDataError(f"{root}: data root does not exist or is not a folder")
    cat_dir = root / category
    if not cat_dir.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise MVTecDataError(f"{cat_dir}: category folder not found (categories here: {', '.join(found) or 'none'})")
    train_dir = cat_dir / "train" / GOOD
    if not train_dir.is_dir():
        raise MVTecDataError(f"{train_dir}: training folder train/good not found")
    train = _image_files(train_dir)
    if not train:
        raise MVTecDataError(f"{train_dir}: no training images (expected {', '.join(IMAGE_SUFFIXES)} files)")
    for path in train:
        _image_size(path)

    test_dir = cat_dir / "test"
    if not test_dir.is_dir():
        raise MVTecDataError(f"{test_dir}: test folder not found")
    gt_dir = cat_dir / "ground_truth"
    samples: list[TestSample] = []
    for defect_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        defect = defect_dir.name
        for image_path in _image_files(defect_dir):
            image_size = _image_size(image_path)
            mask_path = None
            if defect != GOOD:
                mask_path = _find_mask(gt_dir / defect, image_path.stem)
                if mask_path is None:
                    raise MVTecDataError(
                        f"{image_path}: defect image has no mask "
                        f"(expected {gt_dir / defect / (image_path.stem + MASK_SUFFIX)}.png)"
                    )
                mask_size = _image_size(mask_path)
                if mask_size != image_size:
                    raise MVTecDataError(
                        f"{mask_path}: mask is {mask_size[0]}x{mask_size[1]} but its image {image_path} is "
                        f"{image_size[0]}x{image_size[1]}"
                    )
            samples.append(TestSample(image_path, defect, mask_path))
    if not samples:
        raise MVTecDataError(f"{test_dir}: no test images")
    _check_orphan_masks(gt_dir, test_dir)
    return CategoryIndex(root=root, category=category, train=tuple(train), test=tuple(samples))


def _find_mask(folder: Path, stem: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        candidate = folder / f"{stem}{MASK_SUFFIX}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _check_orphan_masks(gt_dir: Path, test_dir: Path) -> None:
    if not gt_dir.is_dir():
        return
    for defect_dir in sorted(p for p in gt_dir.iterdir() if p.is_dir()):
        for mask_path in _image_files(defect_dir):
            stem = mask_path.stem
            image_stem = stem[: -len(MASK_SUFFIX)] if stem.endswith(MASK_SUFFIX) else stem
            folder = test_dir / defect_dir.name
            if not folder.is_dir() or not any((folder / f"{image_stem}{s}").is_file() for s in IMAGE_SUFFIXES):
                raise MVTecDataError(f"{mask_path}: mask has no test image (expected {folder / image_stem}.png)")


def _stack(arrays: Iterable[np.ndarray], count: int, desc: str, progress: bool) -> np.ndarray:
    if progress:
        from tqdm.auto import tqdm

        arrays = tqdm(arrays, total=count, desc=desc, leave=False)
    return np.stack(list(arrays))


@dataclass
class CategoryData:
    """Decoded images of a category (or shard), all ``size``x``size``.

    train_images uint8 (N,H,W,3); test_images uint8 (M,H,W,3); test_masks uint8
    (M,H,W) of 0/1; test_labels int64 (M,); defect_types and test_names, M each.
    """

    category: str
    train_images: np.ndarray
    test_images: np.ndarray
    test_masks: np.ndarray
    test_labels: np.ndarray
    defect_types: list[str] = field(default_factory=list)
    test_names: list[str] = field(default_factory=list)

    @property
    def mean(self) -> np.ndarray:
        """Per-pixel mean of the training images, float32 (H,W,3): the standardisation of both splits."""
        return training_mean(self.train_images)

    def with_test_images(self, indices: Sequence[int]) -> CategoryData:
        """The same training images with only the test images at ``indices`` (in that order)."""
        chosen = list(indices)
        return replace(
            self,
            test_images=self.test_images[chosen],
            test_masks=self.test_masks[chosen],
            test_labels=self.test_labels[chosen],
            defect_types=[self.defect_types[i] for i in chosen],
            test_names=[self.test_names[i] for i in chosen],
        )


def load_category(index: CategoryIndex, size: int = IMAGE_SIZE, progress: bool = False) -> CategoryData:
    """Decode every file of ``index`` into arrays (see :class:`CategoryData`)."""
    train = _stack((read_image(p, size) for p in index.train), len(index.train), "train images", progress)
    test = _stack((read_image(s.image, size) for s in index.test), len(index.test), "test images", progress)
    masks = np.stack([read_mask(s.mask, size) for s in index.test])
    return CategoryData(
        category=index.category,
        train_images=train,
        test_images=test,
        test_masks=masks,
        test_labels=np.array([s.label for s in index.test], dtype=np.int64),
        defect_types=[s.defect_type for s in index.test],
        test_names=[f"{s.defect_type}/{s.image.stem}" for s in index.test],
    )


def training_mean(train_images: np.ndarray) -> np.ndarray:
    """uint8 (N,H,W,3) -> per-pixel mean float32 (H,W,3)."""
    return train_images.mean(axis=0, dtype=np.float64).astype(np.float32)


def standardise(images: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """uint8 (N,H,W,3) -> float32 (N,3,H,W) as ``(x - mean_train) / 255``; ``mean`` from the *training* split."""
    out = (images.astype(np.float32) - mean[None]) / 255.0
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def holdout_split(n_images: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices (fit, held_out) of ``n_images`` training images: every ``round(1/fraction)``-th image is held out.

    Held-out good images judge training without any anomaly (the position loss
    on images the model never trained on). At least one image is held out when
    ``fraction`` > 0 and there are two or more images; none when ``fraction`` is 0.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"holdout fraction {fraction}: must be in [0, 1)")
    everything = np.arange(n_images)
    if fraction == 0 or n_images < 2:
        return everything, everything[:0]
    every = max(2, round(1 / fraction))
    held = everything[every - 1 :: every] if n_images >= every else everything[-1:]
    return np.setdiff1d(everything, held), held


def parse_rank_worldsize(value: str | Sequence[int]) -> tuple[int, int]:
    """'1,2' or (1, 2) -> (rank, world_size), with a clear error for anything else."""
    try:
        parts = [int(v) for v in (value.split(",") if isinstance(value, str) else value)]
    except (TypeError, ValueError):
        parts = []
    if len(parts) != 2 or parts[1] < 1 or not 1 <= parts[0] <= parts[1]:
        raise MVTecDataError(f"rank_worldsize {value!r}: expected 'RANK,WORLD_SIZE' with 1 <= RANK <= WORLD_SIZE")
    return parts[0], parts[1]
