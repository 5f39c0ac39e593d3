"""Training the autoencoder baseline: one epoch of MSE + (1 - SSIM), and the held-out loss that chooses a model.

The epoch has the same shape as Patch SVDD's ``train.train_epoch`` (each image
``repeat`` times, shuffled, a learning-rate schedule over global steps, bf16
autocast where the hardware has it), so the CLI and the federated task call
either the same way.
"""

from __future__ import annotations

from typing import Callable

import torch

from .autoencoder import ConvAutoencoder, reconstruction_losses
from .settings import HELDOUT_METRICS, LRSchedule, TrainSettings
from .train import as_generator, epoch_batches, progress_bar, resolve_precision, set_learning_rate

LOSS_NAMES = ("loss", "mse", "ssim")
HELDOUT_METRIC = HELDOUT_METRICS["autoencoder"]  # the reconstruction loss on held-out good images


def train_autoencoder_epoch(
    model: ConvAutoencoder,
    images: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    repeat: int = 1,
    batch_size: int = TrainSettings.batch_size,
    max_steps: int | None = None,
    generator: int | torch.Generator | None = None,
    schedule: LRSchedule | None = None,
    start_step: int = 0,
    precision: str = "fp32",
    progress: bool = True,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """One epoch over images (N,C,256,256) in [0,1] (see ``autoencoder.as_input``), moved to the model's device.

    ``precision`` 'bf16' or 'auto' runs the network under bf16 autocast (the loss in float32). Returns the
    mean 'loss', 'mse' and 'ssim' over the epoch, and 'steps'.
    """
    device = next(model.parameters()).device
    model.to(memory_format=torch.channels_last)  # a third faster on a CPU; the weights are the same
    images = images.to(device).contiguous(memory_format=torch.channels_last)
    autocast_dtype = resolve_precision(precision, device)
    gen = as_generator(generator)
    batches = epoch_batches(images.shape[0], repeat, batch_size, max_steps, gen)
    model.train()
    sums = dict.fromkeys(LOSS_NAMES, 0.0)
    bar = progress_bar(len(batches)) if progress else None
    for step, index in enumerate(batches):
        set_learning_rate(optimizer, schedule, start_step + step)
        batch = images[index.to(device)]
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            reconstruction = model(batch)
        losses = reconstruction_losses(reconstruction, batch)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        values = {name: float(losses[name].detach()) for name in LOSS_NAMES}
        for name in LOSS_NAMES:
            sums[name] += values[name]
        if on_step is not None:
            on_step(start_step + step, values)
        if bar is not None:
            bar.update()
            bar.set_postfix(mse=f"{values['mse']:.4f}", ssim=f"{values['ssim']:.3f}")
    if bar is not None:
        bar.close()
    result = {name: value / max(len(batches), 1) for name, value in sums.items()}
    result["steps"] = float(len(batches))
    return result


@torch.no_grad()
def heldout_reconstruction(model: ConvAutoencoder, images: torch.Tensor, batch_size: int = 16) -> dict[str, float]:
    """The losses on held-out good images (N,C,256,256) in [0,1], no training, weighted by batch size:
    'heldout_rec' (MSE + 1 - SSIM, the model-choice criterion: lower is better), 'mse', 'ssim'."""
    if images.shape[0] == 0:
        raise ValueError("held-out losses need at least one held-out image")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums = dict.fromkeys(LOSS_NAMES, 0.0)
    for start in range(0, images.shape[0], batch_size):
        batch = images[start : start + batch_size].to(device)
        losses = reconstruction_losses(model(batch), batch)
        for name in LOSS_NAMES:
            sums[name] += float(losses[name]) * batch.shape[0]
    model.train(was_training)
    out = {name: value / images.shape[0] for name, value in sums.items()}
    out[HELDOUT_METRIC] = out.pop("loss")
    return out
