"""Vectorised patch-pair samplers for the two Patch SVDD training losses.

All functions draw a whole batch at once from a ``torch.Generator`` (kept on
the CPU so that runs are reproducible on any device) and crop with one
advanced-indexing gather: no Python loop per sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Class c -> (row step, column step) of the second patch relative to the first.
POSITION_DIRECTIONS = torch.tensor(
    [[-1, -1], [-1, 0], [-1, 1], [0, -1], [0, 1], [1, -1], [1, 0], [1, 1]], dtype=torch.long
)
COLOUR_STD = 0.02  # per-channel shift, N(0, 0.02)
PIXEL_STD = 0.02  # per-pixel noise, N(0, 0.02)


@dataclass
class PatchPairs:
    """Top-left corners of B patch pairs: first at (y1, x1), second at (y2, x2), all (B,) long.

    ``labels`` (B,) holds the position class 0..7 for position pairs, None for SVDD pairs.
    """

    y1: torch.Tensor
    x1: torch.Tensor
    y2: torch.Tensor
    x2: torch.Tensor
    labels: torch.Tensor | None = None


def _uniform_int(low: torch.Tensor, high: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Integers uniform in [low, high] (inclusive), elementwise."""
    u = torch.rand(low.shape, generator=generator)
    return low + (u * (high - low + 1).to(u.dtype)).long().clamp_max(high - low)


def _first_corner(offset: torch.Tensor, span: int, generator: torch.Generator) -> torch.Tensor:
    """First-patch corner in [0, span] such that corner + offset stays in [0, span]."""
    low = (-offset).clamp_min(0)
    high = span - offset.clamp_min(0)
    return _uniform_int(low, high, generator)


def sample_position_pairs(n: int, image_size: int, patch_size: int, generator: torch.Generator) -> PatchPairs:
    """Pairs for the position loss: the second patch is a neighbour of the first in direction c.

    Along each non-zero axis of direction c the offset is 3K/4 + u with u uniform
    in [0, K/4). The first patch is drawn so that the second always lies inside
    the image, so no label is ever wrong.
    """
    if image_size < 2 * patch_size:
        raise ValueError(f"image_size {image_size} too small for position pairs of K={patch_size} (needs 2K)")
    span = image_size - patch_size
    labels = torch.randint(0, 8, (n,), generator=generator)
    magnitude = 3 * patch_size // 4 + torch.randint(0, max(patch_size // 4, 1), (n, 2), generator=generator)
    offset = POSITION_DIRECTIONS[labels] * magnitude  # (n, 2)
    y1 = _first_corner(offset[:, 0], span, generator)
    x1 = _first_corner(offset[:, 1], span, generator)
    return PatchPairs(y1, x1, y1 + offset[:, 0], x1 + offset[:, 1], labels)


def sample_svdd_pairs(n: int, image_size: int, patch_size: int, generator: torch.Generator) -> PatchPairs:
    """Pairs for the SVDD loss: the second patch is the first moved by a jitter of at most K/32 per axis, never
    (0,0)."""
    span = image_size - patch_size
    reach = max(patch_size // 32, 1)
    side = 2 * reach + 1
    # Index into the (side x side) jitter square with the centre (0,0) left out.
    choice = torch.randint(0, side * side - 1, (n,), generator=generator)
    choice = choice + (choice >= (side * side) // 2).long()
    offset = torch.stack([choice // side - reach, choice % side - reach], dim=1)
    y1 = _first_corner(offset[:, 0], span, generator)
    x1 = _first_corner(offset[:, 1], span, generator)
    return PatchPairs(y1, x1, y1 + offset[:, 0], x1 + offset[:, 1])


def crop_patches(
    images: torch.Tensor, image_index: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, patch_size: int
) -> torch.Tensor:
    """Gather B patches: images (N,C,H,W), image_index/ys/xs (B,) -> (B,C,K,K)."""
    device = images.device
    steps = torch.arange(patch_size, device=device)
    rows = (ys.to(device)[:, None] + steps)[:, None, :, None]  # (B,1,K,1)
    cols = (xs.to(device)[:, None] + steps)[:, None, None, :]  # (B,1,1,K)
    channels = torch.arange(images.shape[1], device=device)[None, :, None, None]
    return images[image_index.to(device)[:, None, None, None], channels, rows, cols]


def perturb(patches: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Add a per-channel colour shift and per-pixel noise, both N(0, 0.02): (B,C,K,K) -> same."""
    b, c, k, _ = patches.shape
    shift = torch.randn((b, c, 1, 1), generator=generator) * COLOUR_STD
    noise = torch.randn((b, c, k, k), generator=generator) * PIXEL_STD
    return patches + (shift + noise).to(patches.device)
