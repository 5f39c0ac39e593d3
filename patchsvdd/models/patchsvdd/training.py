"""Patch SVDD training: the two losses, the step of an epoch and the held-out criterion.

The epoch itself runs in ``training.loop.train_epoch``, which local training,
the benchmarks and the federated task all call.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from patchsvdd.models.base import EpochSteps
from patchsvdd.models.patchsvdd.network import LARGE_PATCH, SMALL_PATCH, PatchSVDD, split_quadrants
from patchsvdd.models.patchsvdd.options import PatchSVDDOptions
from patchsvdd.models.patchsvdd.sampling import crop_patches, perturb, sample_position_pairs, sample_svdd_pairs
from patchsvdd.settings import HELDOUT_METRICS
from patchsvdd.training.loop import as_generator

LOSS_NAMES = ("loss", "loss_pos_64", "loss_pos_32", "loss_svdd_64", "loss_svdd_32")
PATCH_SIZES = (LARGE_PATCH, SMALL_PATCH)
HELDOUT_METRIC = HELDOUT_METRICS["patchsvdd"]  # loss_pos_64 + loss_pos_32 on held-out good images
# below a fresh encoder's spread even with PyTorch's default init, above a collapsed one's (docs/training.md)
COLLAPSE_SPREAD = 1e-6
COLLAPSE_PATIENCE = 20  # steps in a row below it
ENCODER_CHUNK = 256  # 32x32 inputs per K=32 encoder call in training (measured best on a 2-core CPU)


def position_loss(
    classifier: torch.nn.Module, emb_first: torch.Tensor, emb_second: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy of the 8-way relative position from the embedding difference; embeddings (B,D,1,1)."""
    return F.cross_entropy(classifier(emb_first - emb_second), labels)


def svdd_loss(emb_first: torch.Tensor, emb_second: torch.Tensor) -> torch.Tensor:
    """Mean L2 distance between embeddings of a patch and its jittered copy; (B,D,1,1) each."""
    return (emb_first - emb_second).flatten(1).norm(dim=1).mean()


@dataclass
class TrainingBatch:
    """The patches of one step, drawn once. For each K in (64, 32):

    ``patches[K]`` (4B,3,K,K): position pair first patches, their neighbours,
    SVDD pair first patches, their jittered copies (in that order; position
    patches perturbed, SVDD patches as cropped, as in the original code);
    ``labels[K]`` (B,) the position classes 0..7.
    """

    patches: dict[int, torch.Tensor]
    labels: dict[int, torch.Tensor]


def sample_batch(images: torch.Tensor, image_index: torch.Tensor, generator: torch.Generator) -> TrainingBatch:
    """Draw the position and SVDD pairs of both K from images[image_index] (images (N,3,H,W), image_index (B,))."""
    size = images.shape[-1]
    n = image_index.shape[0]
    patches, labels = {}, {}
    for k in PATCH_SIZES:
        pos = sample_position_pairs(n, size, k, generator)
        svdd = sample_svdd_pairs(n, size, k, generator)
        crops = [
            crop_patches(images, image_index, p.y1 if first else p.y2, p.x1 if first else p.x2, k)
            for p in (pos, svdd)
            for first in (True, False)
        ]
        patches[k] = torch.cat([perturb(torch.cat(crops[:2]), generator), *crops[2:]])
        assert pos.labels is not None  # position pairs always carry their classes
        labels[k] = pos.labels.to(images.device)
    return TrainingBatch(patches, labels)


def batch_embeddings(model: PatchSVDD, batch: TrainingBatch, chunk: int = ENCODER_CHUNK) -> dict[int, torch.Tensor]:
    """Embeddings (4B,D,1,1) of every patch of ``batch``, per K, with one pass of the K=32 encoder.

    The K=64 patches enter as their four quadrants beside the K=32 patches, in
    channels-last chunks of ``chunk`` 32x32 inputs (the size that keeps a
    layer's activations in a CPU's cache); the K=64 head then combines the
    quadrant embeddings. Equal to ``model.encoder(patches[64])`` and
    ``model.encoder.small(patches[32])`` up to float rounding.
    """
    quadrants = split_quadrants(batch.patches[LARGE_PATCH])
    inputs = torch.cat([quadrants, batch.patches[SMALL_PATCH]]).contiguous(memory_format=torch.channels_last)
    small = torch.cat([model.encoder.small(part) for part in inputs.split(chunk)])
    return {LARGE_PATCH: model.encoder.from_quadrants(small[: len(quadrants)]), SMALL_PATCH: small[len(quadrants) :]}


def batch_losses(
    model: PatchSVDD, batch: TrainingBatch, lambda_svdd: float, embeddings: dict[int, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """'loss' = sum over K of position loss + lambda * SVDD loss, and each part, for one batch.

    ``embeddings`` as :func:`batch_embeddings` returns them (computed when not given).
    """
    embeddings = batch_embeddings(model, batch) if embeddings is None else embeddings
    out: dict[str, torch.Tensor] = {}
    total = torch.zeros(())  # 0 + x is x exactly: the same sum as from a float 0
    for k in PATCH_SIZES:
        pos_a, pos_b, svdd_a, svdd_b = embeddings[k].float().chunk(4)
        out[f"loss_pos_{k}"] = position_loss(model.classifier_for(k), pos_a, pos_b, batch.labels[k])
        out[f"loss_svdd_{k}"] = svdd_loss(svdd_a, svdd_b)
        total = total + out[f"loss_pos_{k}"] + lambda_svdd * out[f"loss_svdd_{k}"]
    out["loss"] = total
    return out


@torch.no_grad()
def heldout_losses(
    model: PatchSVDD, images: torch.Tensor | np.ndarray, pairs: int = 256, batch_size: int = 64, seed: int = 0
) -> dict[str, float]:
    """The four losses on ``pairs`` fixed pairs per loss from held-out good images (N,3,H,W), no training.

    The pairs depend only on ``seed`` and the images, so values from different
    rounds or models compare. 'heldout_pos' = loss_pos_64 + loss_pos_32: the
    model-choice criterion that needs no anomalies (lower is better).
    """
    device = next(model.parameters()).device
    images = torch.as_tensor(images, dtype=torch.float32).to(device)
    if images.shape[0] == 0:
        raise ValueError("held-out losses need at least one held-out image")
    was_training = model.training
    model.eval()
    gen = as_generator(seed)
    order = torch.arange(pairs) % images.shape[0]
    sums = dict.fromkeys(LOSS_NAMES, 0.0)
    for start in range(0, pairs, batch_size):
        index = order[start : start + batch_size]
        losses = batch_losses(model, sample_batch(images, index, gen), lambda_svdd=0.0)
        for name in LOSS_NAMES:
            sums[name] += float(losses[name]) * len(index)
    model.train(was_training)
    out = {name: value / pairs for name, value in sums.items() if name != "loss"}
    out[HELDOUT_METRIC] = out["loss_pos_64"] + out["loss_pos_32"]
    return out


class CollapseError(RuntimeError):
    """The encoder's embeddings lost their spread (a known Patch SVDD failure: lr or lambda too large)."""


def embedding_spread(embeddings: torch.Tensor) -> float:
    """Mean over dimensions of the standard deviation over patches: (B,D,1,1) -> float; 0 for a collapsed encoder."""
    return float(embeddings.detach().float().flatten(1).std(dim=0).mean())


def epoch_steps(
    model: PatchSVDD,
    images: torch.Tensor | np.ndarray,
    lambda_svdd: float = PatchSVDDOptions.lambda_svdd,
    collapse_spread: float = COLLAPSE_SPREAD,
) -> EpochSteps:
    """One epoch's step for ``training.loop.train_epoch``: a batch of standardised images (N,3,H,W) float32
    (see ``data.standardise``, moved to the model's device) -> both losses of both K, lambda ``lambda_svdd``.

    bf16 autocast covers the encoders only. Its values: each loss and the spreads ('spread_64', 'spread_32').
    The check after each step raises CollapseError when the embeddings of either K spread less than
    ``collapse_spread`` for 20 steps in a row.
    """
    device = next(model.parameters()).device
    images = torch.as_tensor(images, dtype=torch.float32).to(device)
    model.train()

    def step(index: torch.Tensor, gen: torch.Generator, autocast_dtype: torch.dtype | None):
        batch = sample_batch(images, index, gen)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            embeddings = batch_embeddings(model, batch)
        losses = batch_losses(model, batch, lambda_svdd, embeddings)
        values = {name: float(losses[name].detach()) for name in LOSS_NAMES}
        values.update({f"spread_{k}": embedding_spread(embeddings[k]) for k in PATCH_SIZES})
        return losses["loss"], values

    collapsed = [0]  # steps in a row below collapse_spread

    def check(global_step: int, values: dict[str, float]) -> None:
        collapsed[0] = collapsed[0] + 1 if min(values[f"spread_{k}"] for k in PATCH_SIZES) < collapse_spread else 0
        if collapsed[0] >= COLLAPSE_PATIENCE:
            raise CollapseError(
                f"the encoder collapsed at step {global_step}: embedding spread "
                f"{values['spread_64']:.2e} (K=64) / {values['spread_32']:.2e} (K=32) below {collapse_spread:.0e} for "
                f"{COLLAPSE_PATIENCE} steps, so every patch looks the same. Lower the learning rate or lambda, "
                "or add warm-up (see docs/training.md)."
            )

    return EpochSteps(step=step, n_images=images.shape[0], shown=("loss_pos_64", "loss_pos_32"), check=check)
