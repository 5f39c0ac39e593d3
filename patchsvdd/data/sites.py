"""Sites made from one category, for studies of federation: splits of its images and each site's acquisition.

``split_sites`` divides a category's training images among sites in given fractions (seeded) and its test
images in equal, defect-type-stratified shares, so that every site has a test set of its own of about the
same size. ``Acquisition`` is a site's own camera and light, a seeded transform of every image of the site
(training and test alike): a colour cast (a gain per channel), a gamma, a blur and a small rotation (the
masks rotate with the images). ``write_site`` writes a site's images as an MVTec AD category of its own, which
an envoy's shard config names like any other. numpy and Pillow only (no torch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from patchsvdd.data.images import IMAGE_SIZE, read_image, read_mask
from patchsvdd.data.mvtec import GOOD, MASK_SUFFIX, CategoryIndex, TestSample, index_category
from patchsvdd.errors import MVTecDataError


def split_sites(index: CategoryIndex, fractions: Sequence[float], seed: int = 0) -> list[CategoryIndex]:
    """One ``CategoryIndex`` per site: the training images shuffled (``seed``) and cut in ``fractions`` (their
    sum 1, each site at least 2 images: one trains, one may be held out), the test images of each defect type
    shuffled and dealt round-robin so that the sites' test sets differ in size by at most one per type."""
    if not fractions or min(fractions) <= 0 or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"fractions {list(fractions)}: positive, summing to 1")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(index.train))
    bounds = np.round(np.cumsum([0.0, *fractions]) * len(order)).astype(int)
    counts = np.diff(bounds)
    if counts.min() < 2:
        raise MVTecDataError(
            f"{index.path / 'train' / GOOD}: {len(index.train)} training images cannot give every site of "
            f"{list(fractions)} at least 2 (sizes {counts.tolist()})"
        )
    test_shares: list[list[TestSample]] = [[] for _ in fractions]
    dealt = 0
    for kind in sorted({sample.defect_type for sample in index.test}):
        samples = [sample for sample in index.test if sample.defect_type == kind]
        for sample in (samples[i] for i in rng.permutation(len(samples))):
            test_shares[dealt % len(fractions)].append(sample)
            dealt += 1
    return [
        replace(
            index,
            train=tuple(index.train[i] for i in sorted(order[start:stop])),
            test=tuple(sorted(share, key=lambda s: (s.defect_type, s.image.name))),
        )
        for start, stop, share in zip(bounds[:-1], bounds[1:], test_shares, strict=True)
    ]


@dataclass(frozen=True)
class Acquisition:
    """A site's camera and light: ``gains`` (r, g, b) multiply the channels, ``gamma`` bends the tones
    (out = in ** gamma on 0..1), ``blur`` is a Gaussian's sigma in pixels (0: sharp), ``rotation`` degrees
    (counter-clockwise, corners filled black; the mask turns with the image). The identity by default."""

    gains: tuple[float, float, float] = (1.0, 1.0, 1.0)
    gamma: float = 1.0
    blur: float = 0.0
    rotation: float = 0.0

    @classmethod
    def drawn(cls, seed: int, strength: float = 1.0) -> Acquisition:
        """A site's acquisition drawn from ``seed``: gains in 1 ± 0.15, gamma in [0.75, 1.33], blur up to
        1.2 px and rotation within ± 4°, each scaled by ``strength`` (0: the identity)."""
        rng = np.random.default_rng([seed, 2027])
        gains = tuple(float(1 + strength * rng.uniform(-0.15, 0.15)) for _ in range(3))
        return cls(
            gains=(gains[0], gains[1], gains[2]),
            gamma=float(np.exp(strength * rng.uniform(np.log(0.75), np.log(1.33)))),
            blur=float(strength * rng.uniform(0.0, 1.2)),
            rotation=float(strength * rng.uniform(-4.0, 4.0)),
        )

    def image(self, image: np.ndarray) -> np.ndarray:
        """uint8 (H,W,3) -> uint8 (H,W,3): gains, gamma, blur, rotation, in that order."""
        tones = np.clip(image.astype(np.float32) / 255.0 * np.asarray(self.gains, np.float32), 0.0, 1.0)
        out = Image.fromarray(np.round(255.0 * tones**self.gamma).astype(np.uint8))
        if self.blur > 0:
            out = out.filter(ImageFilter.GaussianBlur(self.blur))
        if self.rotation:
            out = out.rotate(self.rotation, resample=Image.Resampling.BILINEAR)
        return np.asarray(out)

    def mask(self, mask: np.ndarray) -> np.ndarray:
        """uint8 (H,W) of 0/1 -> the same, turned as the image is (nearest neighbour)."""
        if not self.rotation:
            return mask
        turned = Image.fromarray(mask * np.uint8(255)).rotate(self.rotation, resample=Image.Resampling.NEAREST)
        return (np.asarray(turned) > 127).astype(np.uint8)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def write_site(
    index: CategoryIndex, out_root: Path, acquisition: Acquisition = Acquisition(), size: int = IMAGE_SIZE
) -> CategoryIndex:
    """Write ``index``'s images (``size``x``size``, through ``acquisition``) as the MVTec AD category
    ``out_root/<category>`` (train/good, test/<type>, ground_truth/<type>/<stem>_mask.png); returns the
    written category's index."""
    folder = Path(out_root) / index.category
    if folder.exists():
        raise FileExistsError(f"{folder}: a site folder is written once; remove it first")
    train_dir = folder / "train" / GOOD
    train_dir.mkdir(parents=True)
    for number, path in enumerate(index.train):
        Image.fromarray(acquisition.image(read_image(path, size))).save(train_dir / f"{number:03d}.png")
    for number, sample in enumerate(index.test):
        test_dir = folder / "test" / sample.defect_type
        test_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(acquisition.image(read_image(sample.image, size))).save(test_dir / f"{number:03d}.png")
        if sample.mask is not None:
            mask_dir = folder / "ground_truth" / sample.defect_type
            mask_dir.mkdir(parents=True, exist_ok=True)
            mask = acquisition.mask(read_mask(sample.mask, size))
            Image.fromarray(mask * np.uint8(255)).save(mask_dir / f"{number:03d}{MASK_SUFFIX}.png")
    return index_category(out_root, index.category)
