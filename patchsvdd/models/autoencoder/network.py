"""The convolutional autoencoder baseline: network, MSE + SSIM loss and reconstruction-error maps.

The pipeline many inspection teams start from (as in Bergmann et al., "Improving
unsupervised defect segmentation by applying structural similarity to
autoencoders", 2019): an autoencoder trained on good images only, so that it
cannot reconstruct a defect, scored by where its reconstruction differs from
the input. Pure torch (SSIM from pytorch-msssim for the loss, torchmetrics for
the map): no data loading, no training loop, no file I/O.

Shapes: N images, C channels (3 for RGB data, 1 for grayscale data), H = W = 256,
pixel values in [0, 1].
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from patchsvdd.models.autoencoder.options import LATENT_DIM, WIDTH

FUSIONS = ("l2", "ssim", "sum")  # squared error, 1 - SSIM, and their sum on a common scale
LEAKY_SLOPE = 0.2
SSIM_KERNEL = 11  # Gaussian window of SSIM (sigma 1.5), as in Wang et al. 2004
SMOOTH_SIGMA = 4.0  # Gaussian smoothing of the error maps, in pixels


class ConvAutoencoder(nn.Module):
    """256x256 images through a ``latent_dim`` vector and back.

    Encoder: six 4x4 stride-2 convolutions (widths w, w, 2w, 2w, 4w, 4w; 256 -> 4
    pixels), LeakyReLU 0.2, then a 4x4 convolution to the latent vector (N,L,1,1).
    Decoder: the mirror image with transposed convolutions, ending in a sigmoid,
    so reconstructions are in [0, 1] like the inputs. No batch normalisation:
    FedAvg of running statistics from different sites is not what a site sees.
    """

    def __init__(self, channels: int = 3, latent_dim: int = LATENT_DIM, width: int = WIDTH) -> None:
        super().__init__()
        if channels not in (1, 3):
            raise ValueError(f"channels={channels}: 1 (grayscale) or 3 (RGB)")
        self.channels, self.latent_dim, self.width = channels, latent_dim, width
        widths = (channels, width, width, 2 * width, 2 * width, 4 * width, 4 * width)
        down: list[nn.Module] = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            down += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.LeakyReLU(LEAKY_SLOPE)]
        self.encoder = nn.Sequential(*down, nn.Conv2d(widths[-1], latent_dim, 4))
        up: list[nn.Module] = [nn.ConvTranspose2d(latent_dim, widths[-1], 4), nn.LeakyReLU(LEAKY_SLOPE)]
        reverse = widths[::-1]
        for i, (c_in, c_out) in enumerate(zip(reverse[:-1], reverse[1:])):
            last = i == len(reverse) - 2
            up += [
                nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1),
                nn.Sigmoid() if last else nn.LeakyReLU(LEAKY_SLOPE),
            ]
        self.decoder = nn.Sequential(*up)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(N,C,256,256) -> latent codes (N,L,1,1)."""
        return self.encoder(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N,C,256,256) in [0,1] -> reconstructions (N,C,256,256) in [0,1]."""
        return self.decoder(self.encoder(images))


def as_input(images: np.ndarray, channels: int) -> torch.Tensor:
    """uint8 (N,H,W,3) -> float32 (N,C,H,W) in [0,1]; C=1 keeps the first (gray) channel."""
    array = images[..., :1] if channels == 1 else images
    return torch.from_numpy(np.ascontiguousarray(array.transpose(0, 3, 1, 2))).float().div_(255.0)


def luminance(images: torch.Tensor) -> torch.Tensor:
    """(N,C,H,W) -> (N,1,H,W): the channel mean, in float32 (SSIM compares structure on it)."""
    return images.float().mean(1, keepdim=True)


def ssim_map(reconstructions: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """The SSIM map (N,1,H,W) of the luminance of two batches (N,C,H,W) in [0,1]: 1 where they agree
    (torchmetrics; borders reflected)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    _, full = structural_similarity_index_measure(
        luminance(reconstructions), luminance(images), data_range=1.0, kernel_size=SSIM_KERNEL, return_full_image=True
    )
    return full


def reconstruction_losses(reconstructions: torch.Tensor, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """'loss' = MSE + (1 - SSIM) of a batch (N,C,H,W), with its parts 'mse' and 'ssim' (the mean SSIM of the
    luminance, from pytorch-msssim: its separable window makes the backward pass twice as fast as torchmetrics')."""
    from pytorch_msssim import ssim

    mse = F.mse_loss(reconstructions.float(), images.float())
    similarity = ssim(luminance(reconstructions), luminance(images), data_range=1.0, win_size=SSIM_KERNEL)
    return {"loss": mse + (1.0 - similarity), "mse": mse, "ssim": similarity}


def smooth(maps: torch.Tensor, sigma: float = SMOOTH_SIGMA) -> torch.Tensor:
    """Gaussian smoothing of maps (N,H,W) (torchvision), kernel 4 sigma wide each side."""
    from torchvision.transforms.functional import gaussian_blur

    size = 2 * int(4 * sigma) + 1
    return gaussian_blur(maps[:, None], [size, size], [sigma, sigma])[:, 0]


@torch.no_grad()
def error_maps(model: ConvAutoencoder, images: torch.Tensor, batch_size: int = 16) -> dict[str, torch.Tensor]:
    """Per-pixel reconstruction error of images (N,C,256,256) in [0,1], smoothed, on the CPU:
    'l2' (N,H,W) the squared error averaged over channels, 'ssim' (N,H,W) the dissimilarity (1 - SSIM) / 2."""
    device = next(model.parameters()).device
    model.eval()
    l2, dissimilar = [], []
    for start in range(0, images.shape[0], batch_size):
        batch = images[start : start + batch_size].to(device)
        reconstruction = model(batch)
        l2.append(smooth((reconstruction - batch).pow(2).mean(1)).cpu())
        dissimilar.append(smooth((1.0 - ssim_map(reconstruction, batch)[:, 0]) / 2).cpu())
    empty = torch.zeros(0, *images.shape[-2:])
    return {"l2": torch.cat(l2) if l2 else empty, "ssim": torch.cat(dissimilar) if dissimilar else empty}


def map_scales(good_maps: dict[str, torch.Tensor]) -> dict[str, float]:
    """The mean of each error map over good images (what 'sum' divides by); at least 1e-12."""
    return {name: max(float(good_maps[name].double().mean()), 1e-12) for name in ("l2", "ssim")}


def fuse(maps: dict[str, torch.Tensor], scales: dict[str, float]) -> dict[str, torch.Tensor]:
    """``maps`` with 'sum' = l2 / scale_l2 + ssim / scale_ssim added: both errors in units of their mean on
    good images, so neither dominates by its scale alone."""
    return {**maps, "sum": maps["l2"] / scales["l2"] + maps["ssim"] / scales["ssim"]}


def good_scales(model: ConvAutoencoder, good_images: np.ndarray) -> dict[str, float]:
    """``map_scales`` of the error maps of uint8 good images (N,H,W,3): what a site's 'sum' divides by."""
    return map_scales(error_maps(model, as_input(good_images, model.channels)))


def image_maps(
    model: ConvAutoencoder, images: np.ndarray, scales: dict[str, float], batch_size: int = 16
) -> dict[str, torch.Tensor]:
    """Every map (``FUSIONS``, each (N,H,W)) of uint8 images (N,H,W,3), 'sum' on ``scales``."""
    return fuse(error_maps(model, as_input(images, model.channels), batch_size), scales)
