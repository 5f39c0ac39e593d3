"""Patch SVDD training: the two losses and one epoch of optimisation.

``train_epoch`` is what local training, the benchmarks and the federated
task all call, unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .model import LARGE_PATCH, SMALL_PATCH, PatchSVDD
from .sampling import PatchPairs, crop_patches, perturb, sample_position_pairs, sample_svdd_pairs

LOSS_NAMES = ("loss", "loss_pos_64", "loss_pos_32", "loss_svdd_64", "loss_svdd_32")


@dataclass(frozen=True)
class TrainSettings:
    """Published settings: Adam lr 1e-4, lambda 1e-3, batch 64 per loss, each image 100 times an epoch."""

    lr: float = 1e-4
    lambda_svdd: float = 1e-3
    batch_size: int = 64
    repeat: int = 100


def make_optimizer(model: PatchSVDD, lr: float = TrainSettings.lr) -> torch.optim.Adam:
    """Adam over every parameter of the model (both encoders and both classifiers)."""
    return torch.optim.Adam(model.parameters(), lr=lr)


def position_loss(classifier: torch.nn.Module, emb_first: torch.Tensor, emb_second: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the 8-way relative position from the embedding difference; embeddings (B,D,1,1)."""
    return F.cross_entropy(classifier(emb_first - emb_second), labels)


def svdd_loss(emb_first: torch.Tensor, emb_second: torch.Tensor) -> torch.Tensor:
    """Mean L2 distance between embeddings of a patch and its jittered copy; (B,D,1,1) each."""
    return (emb_first - emb_second).flatten(1).norm(dim=1).mean()


def _pair_embeddings(
    model: PatchSVDD, images: torch.Tensor, image_index: torch.Tensor, pairs: list[PatchPairs], patch_size: int, generator: torch.Generator
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Embed the patches of several pair sets in one forward pass; returns (first, second) per set."""
    crops = []
    for p in pairs:
        crops.append(crop_patches(images, image_index, p.y1, p.x1, patch_size))
        crops.append(crop_patches(images, image_index, p.y2, p.x2, patch_size))
    batch = perturb(torch.cat(crops), generator)
    emb = model.encoder_for(patch_size)(batch).chunk(2 * len(pairs))
    return [(emb[2 * i], emb[2 * i + 1]) for i in range(len(pairs))]


def training_losses(
    model: PatchSVDD, images: torch.Tensor, image_index: torch.Tensor, lambda_svdd: float, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """All four losses for one batch, sampled at once from images[image_index].

    images (N,3,H,W) standardised, on the model's device; image_index (B,).
    Returns 'loss' = sum of position losses + lambda * sum of SVDD losses, and each part.
    """
    size = images.shape[-1]
    n = image_index.shape[0]
    out: dict[str, torch.Tensor] = {}
    total = images.new_zeros(())
    for k in (LARGE_PATCH, SMALL_PATCH):
        pos = sample_position_pairs(n, size, k, generator)
        svdd = sample_svdd_pairs(n, size, k, generator)
        (pos_a, pos_b), (svdd_a, svdd_b) = _pair_embeddings(model, images, image_index, [pos, svdd], k, generator)
        out[f"loss_pos_{k}"] = position_loss(model.classifier_for(k), pos_a, pos_b, pos.labels.to(images.device))
        out[f"loss_svdd_{k}"] = svdd_loss(svdd_a, svdd_b)
        total = total + out[f"loss_pos_{k}"] + lambda_svdd * out[f"loss_svdd_{k}"]
    out["loss"] = total
    return out


def as_generator(seed_or_generator: int | torch.Generator | None) -> torch.Generator:
    """A CPU generator: the one given, one seeded with the int given, or a randomly seeded one."""
    if isinstance(seed_or_generator, torch.Generator):
        return seed_or_generator
    generator = torch.Generator()
    if seed_or_generator is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed_or_generator))
    return generator


def train_epoch(
    model: PatchSVDD,
    images: torch.Tensor | np.ndarray,
    optimizer: torch.optim.Optimizer,
    *,
    repeat: int = TrainSettings.repeat,
    batch_size: int = TrainSettings.batch_size,
    lambda_svdd: float = TrainSettings.lambda_svdd,
    max_steps: int | None = None,
    generator: int | torch.Generator | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """One epoch: every training image is used ``repeat`` times, in batches of ``batch_size``.

    images (N,3,H,W) float32 standardised (see ``data.standardise``); moved to the
    model's device. ``max_steps`` cuts the epoch short (for quick runs).
    Returns the mean of each loss over the epoch and 'steps'.
    """
    device = next(model.parameters()).device
    images = torch.as_tensor(images, dtype=torch.float32).to(device)
    gen = as_generator(generator)
    n_images = images.shape[0]
    order = torch.arange(n_images).repeat(repeat)[torch.randperm(n_images * repeat, generator=gen)]
    steps = math.ceil(len(order) / batch_size)
    if max_steps is not None:
        steps = min(steps, max_steps)
    model.train()
    sums = dict.fromkeys(LOSS_NAMES, 0.0)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="train", leave=False)
    for step in range(steps):
        image_index = order[step * batch_size : (step + 1) * batch_size]
        losses = training_losses(model, images, image_index, lambda_svdd, gen)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        for name in LOSS_NAMES:
            sums[name] += float(losses[name].detach())
        if bar is not None:
            bar.update()
            bar.set_postfix(loss=f"{float(losses['loss']):.3f}")
    if bar is not None:
        bar.close()
    result = {name: value / max(steps, 1) for name, value in sums.items()}
    result["steps"] = float(steps)
    return result
