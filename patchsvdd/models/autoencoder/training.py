"""Training the autoencoder baseline: the step of an epoch of MSE + (1 - SSIM), and the held-out loss that
chooses a model.

The epoch runs in ``training.loop.train_epoch``, the loop of every model (each
image ``repeat`` times, shuffled, a learning-rate schedule over global steps,
bf16 autocast where the hardware has it).
"""

from __future__ import annotations

import torch

from patchsvdd.models.autoencoder.network import ConvAutoencoder, reconstruction_losses
from patchsvdd.models.base import EpochSteps
from patchsvdd.settings import HELDOUT_METRICS

LOSS_NAMES = ("loss", "mse", "ssim")
HELDOUT_METRIC = HELDOUT_METRICS["autoencoder"]  # the reconstruction loss on held-out good images


def epoch_steps(model: ConvAutoencoder, images: torch.Tensor) -> EpochSteps:
    """One epoch's step for ``training.loop.train_epoch``: a batch of images (N,C,256,256) in [0,1] (see
    ``network.as_input``, moved to the model's device) -> MSE + (1 - SSIM). bf16 autocast covers the network,
    not the loss. Its values: 'loss', 'mse' and 'ssim'.
    """
    device = next(model.parameters()).device
    model.to(memory_format=torch.channels_last)  # a third faster on a CPU; the weights are the same
    images = images.to(device).contiguous(memory_format=torch.channels_last)
    model.train()

    def step(index: torch.Tensor, generator: torch.Generator, autocast_dtype: torch.dtype | None):
        batch = images[index.to(device)]
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            reconstruction = model(batch)
        losses = reconstruction_losses(reconstruction, batch)
        return losses["loss"], {name: float(losses[name].detach()) for name in LOSS_NAMES}

    return EpochSteps(step=step, n_images=images.shape[0], shown=("mse", "ssim"))


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
