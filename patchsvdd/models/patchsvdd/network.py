"""Patch SVDD networks (Yi & Yoon, ACCV 2020): encoders and position classifiers.

Pure ``torch.nn``: no data loading, no training loop, no file I/O.

Shapes use N for batch, D for the embedding size (``emb_dim``), K for the
receptive field (patch size) of an encoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from patchsvdd.models.patchsvdd.options import EMB_DIM, INIT_SCHEMES

LEAKY_SLOPE = 0.1
SMALL_PATCH = 32  # K of the small encoder
LARGE_PATCH = 64  # K of the hierarchical encoder
SMALL_ENCODER_CHANNELS = (3, 32, 64, 128, 128, 64, 32, 32)  # then D


class SmallEncoder(nn.Module):
    """Encoder with receptive field K=32: eight unpadded 3x3 convolutions.

    (N,3,32,32) -> (N,D,1,1). Being fully convolutional, a larger input
    (N,3,H,W) gives the embedding of every 32x32 window at stride 2:
    (N,D,(H-32)//2+1,(W-32)//2+1).
    """

    patch_size = SMALL_PATCH
    native_stride = 2

    def __init__(self, emb_dim: int = EMB_DIM) -> None:
        super().__init__()
        channels = (*SMALL_ENCODER_CHANNELS, emb_dim)
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:])):
            layers.append(nn.Conv2d(c_in, c_out, kernel_size=3, stride=2 if i == 0 else 1))
            last = i == len(channels) - 2
            layers.append(nn.Tanh() if last else nn.LeakyReLU(LEAKY_SLOPE))
        self.layers = nn.Sequential(*layers)
        self.emb_dim = emb_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N,3,H,W) with H,W >= 32 -> (N,D,(H-32)//2+1,(W-32)//2+1)."""
        return self.layers(x)


def split_quadrants(patches: torch.Tensor) -> torch.Tensor:
    """(N,C,2h,2w) patches -> (4N,C,h,w) quadrants, those of one patch consecutive, in row-major order."""
    n, c, h, w = patches.shape
    half_h, half_w = h // 2, w // 2
    # (N,C,2,h,2,w) -> (N,2,2,C,h,w)
    return patches.reshape(n, c, 2, half_h, 2, half_w).permute(0, 2, 4, 1, 3, 5).reshape(n * 4, c, half_h, half_w)


class HierarchicalEncoder(nn.Module):
    """Encoder with receptive field K=64 built on the K=32 encoder ``.small``.

    A 64x64 patch is split into its four 32x32 quadrants, each embedded by
    ``.small``; the 2x2 map of those embeddings goes through a 2x2 convolution
    D->128, LeakyReLU, a 1x1 convolution 128->D and tanh.
    """

    patch_size = LARGE_PATCH

    def __init__(self, emb_dim: int = EMB_DIM, hidden: int = 128) -> None:
        super().__init__()
        self.small = SmallEncoder(emb_dim)
        self.combine = nn.Conv2d(emb_dim, hidden, kernel_size=2)
        self.project = nn.Conv2d(hidden, emb_dim, kernel_size=1)
        self.emb_dim = emb_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N,3,64,64) patches -> (N,D,1,1) embeddings."""
        h, w = x.shape[-2:]
        if (h, w) != (LARGE_PATCH, LARGE_PATCH):
            raise ValueError(f"HierarchicalEncoder takes 64x64 patches, got {h}x{w}; use PatchSVDD.embed for images")
        return self.from_quadrants(self.small(split_quadrants(x)))

    def from_quadrants(self, quadrant_embeddings: torch.Tensor) -> torch.Tensor:
        """K=64 embeddings (N,D,1,1) from the K=32 embeddings of their quadrants (4N,D,1,1).

        The quadrants are ordered as :func:`split_quadrants` lays them out, so
        the K=32 encoder can run once over quadrants and other patches alike.
        """
        n = quadrant_embeddings.shape[0] // 4
        grid = quadrant_embeddings.reshape(n, 2, 2, self.emb_dim).permute(0, 3, 1, 2)  # (N,D,2,2)
        return self._head(grid, dilation=1, stride=1)

    def dense(self, small_map: torch.Tensor, stride: int = 1) -> torch.Tensor:
        """K=64 embeddings from a dense K=32 map at stride 2.

        ``small_map`` (N,D,h,w) as returned by ``.small`` on a whole image.
        Quadrants 32 pixels apart are 16 cells apart, so the 2x2 head becomes a
        2x2 convolution with dilation 16. ``stride`` counts cells of the
        stride-2 map: stride 8 gives the K=64 grid at 16 pixels.
        Returns (N,D,(h-17)//stride+1,(w-17)//stride+1).
        """
        return self._head(small_map, dilation=SMALL_PATCH // SmallEncoder.native_stride, stride=stride)

    def _head(self, grid: torch.Tensor, dilation: int, stride: int) -> torch.Tensor:
        hidden = F.conv2d(grid, self.combine.weight, self.combine.bias, stride=stride, dilation=dilation)
        return torch.tanh(self.project(F.leaky_relu(hidden, LEAKY_SLOPE)))


class NormalizedLinear(nn.Linear):
    """Linear layer whose weight is used with unit-norm columns and gets no gradient.

    As in the original classifier's last layer: the weight is normalised under
    ``no_grad`` at every call, so only the bias trains.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            weight = self.weight / self.weight.norm(dim=0, keepdim=True)
        return F.linear(x, weight, self.bias)


class PositionClassifier(nn.Module):
    """Predicts which of 8 neighbour positions a second patch took.

    Input: difference of two embeddings, (N,D) or (N,D,1,1). Output: (N,8) logits.
    """

    n_classes = 8

    def __init__(self, emb_dim: int = EMB_DIM, hidden: int = 128) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(emb_dim, hidden),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.Linear(hidden, hidden),
            nn.LeakyReLU(LEAKY_SLOPE),
            NormalizedLinear(hidden, self.n_classes),
        )

    def forward(self, emb_difference: torch.Tensor) -> torch.Tensor:
        return self.layers(emb_difference.flatten(1))


class PatchSVDD(nn.Module):
    """The whole model: hierarchical encoder (K=64, with K=32 inside) and two position classifiers.

    ``init``: 'kaiming' (the project's default, see :func:`initialise`) or
    'pytorch' (PyTorch's default, as the original code).

    ``strides`` maps each K to the stride S of its inference grid (K=64: 16, K=32: 4).
    """

    patch_sizes = (LARGE_PATCH, SMALL_PATCH)
    strides = {LARGE_PATCH: 16, SMALL_PATCH: 4}

    def __init__(self, emb_dim: int = EMB_DIM, init: str = "kaiming") -> None:
        super().__init__()
        self.emb_dim = emb_dim
        self.encoder = HierarchicalEncoder(emb_dim)
        self.classifier64 = PositionClassifier(emb_dim)
        self.classifier32 = PositionClassifier(emb_dim)
        if init != "pytorch":  # the layers were just built with PyTorch's default
            initialise(self, init)

    def encoder_for(self, patch_size: int) -> nn.Module:
        """The encoder whose receptive field is ``patch_size`` (64 or 32)."""
        return {LARGE_PATCH: self.encoder, SMALL_PATCH: self.encoder.small}[patch_size]

    def classifier_for(self, patch_size: int) -> PositionClassifier:
        """The position classifier of ``patch_size`` (64 or 32)."""
        return {LARGE_PATCH: self.classifier64, SMALL_PATCH: self.classifier32}[patch_size]

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense embeddings of whole standardised images, fully convolutionally.

        images (N,3,H,W), for 256x256: returns (emb64 (N,D,13,13), emb32 (N,D,57,57)),
        the K=64 grid at stride 16 and the K=32 grid at stride 4. Equal to
        embedding each patch on its own (the encoders have no padding).
        """
        small_map = self.encoder.small(images)  # K=32 windows at stride 2
        cells32 = self.strides[SMALL_PATCH] // SmallEncoder.native_stride
        cells64 = self.strides[LARGE_PATCH] // SmallEncoder.native_stride
        emb32 = small_map[:, :, ::cells32, ::cells32]
        emb64 = self.encoder.dense(small_map, stride=cells64)
        return emb64, emb32


def initialise(model: nn.Module, scheme: str = "kaiming") -> nn.Module:
    """Re-draw the weights of every convolution and linear layer of ``model`` in place (torch's global RNG).

    'kaiming': He-normal weights for LeakyReLU(0.1) and zero biases, so a fresh
    encoder's embeddings spread and the position loss has something to learn
    from at step 0. 'pytorch': PyTorch's default (what the original code uses):
    the signal shrinks through the eight layers and a fresh encoder's output is
    nearly constant (the measured spreads: docs/training.md).
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"init {scheme!r}: choose {' or '.join(INIT_SCHEMES)}")
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            if scheme == "pytorch":
                module.reset_parameters()
                continue
            nn.init.kaiming_normal_(module.weight, a=LEAKY_SLOPE, nonlinearity="leaky_relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model
