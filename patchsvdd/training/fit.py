"""One epoch of either model (Patch SVDD or the autoencoder) from uint8 images: what the command line,
the federated task and the benchmarks call, so that each model's input and recipe are set in one place."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from patchsvdd.models.autoencoder.network import ConvAutoencoder, as_input
from patchsvdd.models.autoencoder.training import train_autoencoder_epoch
from patchsvdd.data.mvtec import standardise
from patchsvdd.training.loop import EpochPlan
from patchsvdd.settings import LRSchedule, TrainSettings
from patchsvdd.models.patchsvdd.training import train_epoch


def model_inputs(model: nn.Module, images: np.ndarray, mean: np.ndarray) -> torch.Tensor:
    """uint8 training images (N,H,W,3) as ``model`` trains on them: Patch SVDD (N,3,H,W) float32 less the
    training ``mean`` (H,W,3), over 255; the autoencoder (N,C,H,W) in [0,1] with its C channels."""
    if isinstance(model, ConvAutoencoder):
        return as_input(images, model.channels)
    return torch.from_numpy(standardise(images, mean))


def train_one_epoch(
    model: nn.Module, inputs: torch.Tensor, optimizer: torch.optim.Optimizer, recipe: TrainSettings, *,
    repeat: int | None = None, max_steps: int | None = None, generator: int | torch.Generator | None = None,
    schedule: LRSchedule | None = None, start_step: int = 0, progress: bool = False,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """One epoch of ``model`` on ``inputs`` (from ``model_inputs``) with ``recipe``'s batch size, precision,
    repeat (unless ``repeat`` is given) and, for Patch SVDD, lambda; returns the epoch's mean losses
    (``train_epoch`` or ``train_autoencoder_epoch``)."""
    plan = EpochPlan(repeat=recipe.repeat if repeat is None else repeat, batch_size=recipe.batch_size,
                     max_steps=max_steps, generator=generator, schedule=schedule, start_step=start_step,
                     precision=recipe.precision, progress=progress, on_step=on_step)
    if isinstance(model, ConvAutoencoder):
        return train_autoencoder_epoch(model, inputs, optimizer, plan)
    return train_epoch(model, inputs, optimizer, lambda_svdd=recipe.lambda_svdd, **vars(plan))
