"""Samplers: positions inside the image, labels that match the geometry, jitter bounds."""

from __future__ import annotations

import pytest
import torch

from patchsvdd.models.patchsvdd.sampling import (
    POSITION_DIRECTIONS,
    crop_patches,
    perturb,
    sample_position_pairs,
    sample_svdd_pairs,
)


@pytest.mark.parametrize("patch_size", [64, 32])
def test_position_pairs_fit_and_match_their_labels(patch_size: int) -> None:
    gen = torch.Generator().manual_seed(0)
    pairs = sample_position_pairs(20000, 256, patch_size, gen)
    span = 256 - patch_size
    for coord in (pairs.y1, pairs.x1, pairs.y2, pairs.x2):
        assert coord.min() >= 0 and coord.max() <= span
    dy, dx = pairs.y2 - pairs.y1, pairs.x2 - pairs.x1
    direction = POSITION_DIRECTIONS[pairs.labels]
    assert torch.equal(torch.sign(dy), direction[:, 0]) and torch.equal(torch.sign(dx), direction[:, 1])
    for step in (dy, dx):
        moved = step[step != 0].abs()
        assert moved.min() >= 3 * patch_size // 4 and moved.max() < patch_size
    assert set(pairs.labels.tolist()) == set(range(8))
    # First patches reach both borders, so the constraint does not shrink the image.
    assert pairs.y1.min() == 0 and pairs.y1.max() == span


@pytest.mark.parametrize("patch_size,reach", [(64, 2), (32, 1)])
def test_svdd_pairs_are_small_nonzero_jitters(patch_size: int, reach: int) -> None:
    gen = torch.Generator().manual_seed(1)
    pairs = sample_svdd_pairs(20000, 256, patch_size, gen)
    dy, dx = pairs.y2 - pairs.y1, pairs.x2 - pairs.x1
    assert dy.abs().max() == reach and dx.abs().max() == reach
    assert ((dy != 0) | (dx != 0)).all()
    assert len(set(zip(dy.tolist(), dx.tolist()))) == (2 * reach + 1) ** 2 - 1
    for coord in (pairs.y1, pairs.x1, pairs.y2, pairs.x2):
        assert coord.min() >= 0 and coord.max() <= 256 - patch_size


def test_crop_patches_equals_slicing() -> None:
    images = torch.randn(3, 3, 40, 50)
    idx, ys, xs = torch.tensor([2, 0, 2]), torch.tensor([0, 5, 8]), torch.tensor([18, 0, 3])
    patches = crop_patches(images, idx, ys, xs, 32)
    for b in range(3):
        assert torch.equal(patches[b], images[idx[b], :, ys[b] : ys[b] + 32, xs[b] : xs[b] + 32])


def test_perturb_noise_levels_and_seeding() -> None:
    patches = torch.zeros(2000, 3, 32, 32)
    a = perturb(patches, torch.Generator().manual_seed(5))
    b = perturb(patches, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    channel_shift = a.mean(dim=(2, 3))
    assert channel_shift.std().item() == pytest.approx(0.02, rel=0.1)
    assert (a - a.mean(dim=(2, 3), keepdim=True)).std().item() == pytest.approx(0.02, rel=0.05)


def test_samplers_are_deterministic_for_a_seed() -> None:
    p1 = sample_position_pairs(100, 256, 64, torch.Generator().manual_seed(9))
    p2 = sample_position_pairs(100, 256, 64, torch.Generator().manual_seed(9))
    assert torch.equal(p1.y1, p2.y1) and torch.equal(p1.labels, p2.labels)
    with pytest.raises(ValueError, match="too small"):
        sample_position_pairs(4, 100, 64, torch.Generator())
