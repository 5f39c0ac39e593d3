"""Built-in demo data: procedurally drawn categories written in the exact MVTec AD layout.

Textures (a woven fabric in colour, a grayscale wire mesh) and an object (a
washer), each with realistic defects and pixel masks. Images are larger than
256 pixels so that the reader's resizing is exercised. Deterministic for a
seed: every image draws from its own generator seeded by (seed, category,
split, index). numpy and Pillow only.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

Array = np.ndarray
SYNTH_VERSION = 3  # bump when images change for the same seed; the demo regenerates older trees
MARKER = ".patchsvdd-synth.json"  # written in the category folder: version and arguments


@dataclass(frozen=True)
class SynthCategory:
    """How one category looks: a background painter, its defect types, grayscale or colour."""

    painter: Callable[[np.random.Generator, int], Array]  # -> float32 (S,S,3) in [0,1]
    defects: tuple[str, ...]
    grayscale: bool
    object_region: Callable[[int], Array] | None = None  # -> bool (S,S) where defects may start


def _grid(size: int) -> tuple[Array, Array]:
    ax = np.arange(size, dtype=np.float32)
    return np.meshgrid(ax, ax, indexing="ij")


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> Array:
    """Low-frequency noise in [-1,1], float32 (S,S): a coarse random grid upsampled bicubic."""
    coarse = rng.uniform(0, 255, size=(cells, cells)).astype(np.uint8)
    up = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(up, dtype=np.float32) / 127.5 - 1.0


def _paint_fabric(rng: np.random.Generator, size: int) -> Array:
    """Plain weave: two thread directions alternating over and under, slightly rotated."""
    y, x = _grid(size)
    angle = np.deg2rad(rng.uniform(-2.0, 2.0))
    period = rng.uniform(11.0, 12.5)
    u = (np.cos(angle) * x + np.sin(angle) * y) / period + rng.uniform(0, 1)
    v = (-np.sin(angle) * x + np.cos(angle) * y) / period + rng.uniform(0, 1)
    warp = np.abs(np.sin(np.pi * u)) ** 0.6
    weft = np.abs(np.sin(np.pi * v)) ** 0.6
    over = (np.floor(u) + np.floor(v)) % 2
    pattern = np.where(over == 0, warp * (0.6 + 0.4 * weft), weft * (0.6 + 0.4 * warp))
    shade = 0.55 + 0.35 * pattern + 0.04 * _smooth_noise(rng, size, 6) + rng.normal(0, 0.025, (size, size))
    colour = np.array([0.62, 0.45, 0.30], dtype=np.float32) * rng.uniform(0.95, 1.05, 3)
    return np.clip(shade[..., None] * colour / 0.6, 0, 1).astype(np.float32)


def _paint_mesh(rng: np.random.Generator, size: int) -> Array:
    """Wire mesh: bright wires on a dark ground, grayscale."""
    y, x = _grid(size)
    period = rng.uniform(15.5, 16.5)
    phase_y, phase_x = rng.uniform(0, period, 2)
    dy = np.abs(((y + phase_y) % period) - period / 2)
    dx = np.abs(((x + phase_x) % period) - period / 2)
    wire = np.clip(1.0 - np.minimum(dy, dx) / 2.2, 0, 1)
    shade = 0.22 + 0.55 * wire + 0.05 * _smooth_noise(rng, size, 5) + rng.normal(0, 0.03, (size, size))
    return np.repeat(np.clip(shade, 0, 1)[..., None], 3, axis=2).astype(np.float32)


def _washer_geometry(size: int) -> tuple[float, float]:
    # Outer and inner radius. The washer fills the frame, as MVTec's objects do: on a
    # featureless table the position task has nothing to learn (version 2 showed 63 % table).
    return 0.47 * size, 0.15 * size


def _paint_washer(rng: np.random.Generator, size: int) -> Array:
    """A metal washer with brushed shading on a dark textured table, nearly centred."""
    y, x = _grid(size)
    cy, cx = size / 2 + rng.uniform(-3, 3, 2)
    radius = np.hypot(y - cy, x - cx)
    angle = np.arctan2(y - cy, x - cx)
    outer, inner = _washer_geometry(size)
    table = (
        0.16
        + 0.03 * _smooth_noise(rng, size, 8)
        + 0.03 * _smooth_noise(rng, size, 48)
        + rng.normal(0, 0.02, (size, size))
    )
    ring = (radius < outer) & (radius > inner)
    grain = np.sin(radius * rng.uniform(2.6, 3.0) + 0.8 * _smooth_noise(rng, size, 24))  # concentric machining marks
    brushed = 0.62 + 0.12 * np.sin(angle * 2 + rng.uniform(0, np.pi)) + 0.05 * np.sin(radius * 0.9) + 0.04 * grain
    edge = np.clip(np.minimum(outer - radius, radius - inner) / 3.0, 0, 1)
    shade = np.where(ring, table + edge * (brushed - table), table) + rng.normal(0, 0.02, (size, size))
    tint = np.array([0.92, 0.95, 1.0], dtype=np.float32)
    return np.clip(shade[..., None] * tint, 0, 1).astype(np.float32)


def _washer_region(size: int) -> Array:
    y, x = _grid(size)
    radius = np.hypot(y - size / 2, x - size / 2)
    outer, inner = _washer_geometry(size)
    return (radius < outer - 12) & (radius > inner + 12)


CATEGORIES: dict[str, SynthCategory] = {
    "fabric": SynthCategory(_paint_fabric, ("crack", "hole", "scratch", "stain"), grayscale=False),
    "mesh": SynthCategory(_paint_mesh, ("broken", "hole", "scratch", "stain"), grayscale=True),
    "washer": SynthCategory(
        _paint_washer, ("crack", "missing", "scratch", "stain"), grayscale=False, object_region=_washer_region
    ),
}


def _start_point(rng: np.random.Generator, size: int, region: Array | None, margin: int) -> tuple[float, float]:
    if region is not None:
        ys, xs = np.nonzero(region)
        i = rng.integers(len(ys))
        return float(ys[i]), float(xs[i])
    y, x = rng.uniform(margin, size - margin, 2)
    return float(y), float(x)


def _draw_mask(size: int, draw: Callable[[ImageDraw.ImageDraw], None], blur: float = 0.0) -> Array:
    canvas = Image.new("L", (size, size), 0)
    draw(ImageDraw.Draw(canvas))
    if blur:
        canvas = canvas.filter(ImageFilter.GaussianBlur(blur))
    return np.asarray(canvas, dtype=np.float32) / 255.0


def _defect(rng: np.random.Generator, image: Array, kind: str, region: Array | None) -> tuple[Array, Array]:
    """Apply one defect of ``kind`` to ``image`` (S,S,3). Returns (image, alpha (S,S) in [0,1]).

    Defects are deliberately subtle: contrast and size are drawn from ranges
    that reach down to barely visible (faint stains, hairline scratches and
    cracks, pin holes, small bites), so that a detector has to learn what the
    surface looks like rather than spot any dark or bright blob.
    """
    size = image.shape[0]
    cy, cx = _start_point(rng, size, region, margin=size // 6)
    out = image.copy()
    if kind == "scratch":  # a thin, faintly bright curved line
        length, angle = rng.uniform(0.1, 0.25) * size, rng.uniform(0, np.pi)
        bend = rng.uniform(-0.3, 0.3)
        t = np.linspace(-0.5, 0.5, 24)
        pts = [(cx + length * s * np.cos(angle + bend * s), cy + length * s * np.sin(angle + bend * s)) for s in t]
        alpha = _draw_mask(size, lambda d: d.line(pts, fill=255, width=int(rng.integers(1, 4))), blur=0.6)
        out = out + alpha[..., None] * (0.95 - out) * rng.uniform(0.35, 0.7)
    elif kind in ("crack", "broken"):  # a jagged, slightly dark hairline random walk
        steps = int(rng.integers(10, 20))
        heading = rng.uniform(0, 2 * np.pi)
        pts = [(cx, cy)]
        for _ in range(steps):
            heading += rng.normal(0, 0.6)
            pts.append((pts[-1][0] + 4 * np.cos(heading), pts[-1][1] + 4 * np.sin(heading)))
        alpha = _draw_mask(size, lambda d: d.line(pts, fill=255, width=int(rng.integers(1, 4))), blur=0.5)
        out = out * (1 - rng.uniform(0.4, 0.7) * alpha[..., None])
    elif kind == "hole":  # a small dark opening
        r = rng.uniform(0.015, 0.035) * size
        box = (cx - r, cy - r, cx + r, cy + r)
        alpha = _draw_mask(size, lambda d: d.ellipse(box, fill=255), blur=1.0)
        out = out * (1 - rng.uniform(0.5, 0.85) * alpha[..., None])
    elif kind == "stain":  # a soft, faint tinted blob
        r = rng.uniform(0.03, 0.06) * size
        blobs = [(cx + rng.normal(0, r / 2), cy + rng.normal(0, r / 2), r * rng.uniform(0.5, 1)) for _ in range(3)]

        def draw(d: ImageDraw.ImageDraw) -> None:
            for bx, by, br in blobs:
                d.ellipse((bx - br, by - br, bx + br, by + br), fill=255)

        alpha = _draw_mask(size, draw, blur=3.0)
        strength = rng.uniform(0.2, 0.4)
        tint = np.array([0.55, 0.5, 0.3], dtype=np.float32)
        out = out * (1 - strength * alpha[..., None]) + strength * alpha[..., None] * tint * out.mean(
            axis=2, keepdims=True
        )
    elif kind == "missing":  # a small bite out of the object's outer edge, showing the table
        outer, _ = _washer_geometry(size)
        theta = rng.uniform(0, 2 * np.pi)
        bx, by = size / 2 + outer * np.cos(theta), size / 2 + outer * np.sin(theta)
        r = rng.uniform(0.03, 0.06) * size
        alpha = _draw_mask(size, lambda d: d.ellipse((bx - r, by - r, bx + r, by + r), fill=255), blur=0.8)
        ring = image.mean(axis=2) > 0.3
        alpha = alpha * ring
        table = 0.16 + rng.normal(0, 0.02, image.shape[:2]).astype(np.float32)
        out = out * (1 - alpha[..., None]) + alpha[..., None] * table[..., None]
    else:
        raise ValueError(f"unknown defect kind {kind!r}")
    return np.clip(out, 0, 1), alpha


def _rng(seed: int, category: str, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(category.encode()), zlib.crc32(split.encode()), index])


def _to_pil(image: Array, grayscale: bool) -> Image.Image:
    pixels = np.round(image * 255).astype(np.uint8)
    return Image.fromarray(pixels[..., 0], "L") if grayscale else Image.fromarray(pixels, "RGB")


def generate_category(
    out: str | Path,
    category: str = "fabric",
    seed: int = 0,
    n_train: int = 60,
    n_test_good: int = 40,
    n_test_per_defect: int = 20,
    image_size: int = 320,
) -> Path:
    """Write ``<out>/<category>`` in the MVTec AD layout. Returns that folder.

    Good images everywhere; one folder per defect type under ``test`` with
    masks under ``ground_truth/<defect>/<name>_mask.png`` (0 or 255).
    """
    if category not in CATEGORIES:
        raise ValueError(f"unknown demo category {category!r}; choose from {', '.join(CATEGORIES)}")
    if image_size < 256:
        raise ValueError(f"image_size {image_size}: demo images must be at least 256 pixels")
    spec = CATEGORIES[category]
    region = spec.object_region(image_size) if spec.object_region else None
    root = Path(out) / category

    def save(image: Array, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        _to_pil(image, spec.grayscale).save(path)

    for i in range(n_train):
        save(spec.painter(_rng(seed, category, "train", i), image_size), root / "train" / "good" / f"{i:03d}.png")
    for i in range(n_test_good):
        save(spec.painter(_rng(seed, category, "test_good", i), image_size), root / "test" / "good" / f"{i:03d}.png")
    for kind in spec.defects:
        for i in range(n_test_per_defect):
            rng = _rng(seed, category, f"test_{kind}", i)
            image, alpha = _defect(rng, spec.painter(rng, image_size), kind, region)
            save(image, root / "test" / kind / f"{i:03d}.png")
            mask = Image.fromarray(np.where(alpha >= 0.5, 255, 0).astype(np.uint8), "L")
            mask_path = root / "ground_truth" / kind / f"{i:03d}_mask.png"
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            mask.save(mask_path)
    (root / MARKER).write_text(
        json.dumps(
            {
                "version": SYNTH_VERSION,
                "seed": seed,
                "n_train": n_train,
                "n_test_good": n_test_good,
                "n_test_per_defect": n_test_per_defect,
                "image_size": image_size,
            }
        )
    )
    return root


def generated_with(category_dir: str | Path) -> dict[str, int] | None:
    """What wrote ``category_dir``: the synth version and ``generate_category``'s arguments (seed, sizes),
    as its marker file records them; None for anything else, e.g. real data."""
    try:
        recorded = json.loads((Path(category_dir) / MARKER).read_text())
        return {key: int(value) for key, value in recorded.items()}
    except (OSError, ValueError, AttributeError, TypeError):
        return None
