"""The autoencoder baseline's own options (standard library only)."""

from __future__ import annotations

from dataclasses import dataclass, field

from patchsvdd.errors import SettingsError

LATENT_DIM = 128  # L, the size of the bottleneck vector
WIDTH = 32  # channels of the first convolution; doubled twice on the way down


@dataclass(frozen=True)
class AutoencoderOptions:
    """``latent_dim``: L, the size of the vector every image passes through; ``width``: channels of the first
    convolution (doubled twice on the way down)."""

    latent_dim: int = field(default=LATENT_DIM, metadata={"help": "L, the bottleneck vector's size"})
    width: int = field(default=WIDTH, metadata={"help": "channels of the first convolution"})

    def __post_init__(self) -> None:
        if not (1 <= self.latent_dim <= 4096 and 1 <= self.width <= 512):
            raise SettingsError(f"latent_dim={self.latent_dim}, width={self.width}: from 1 to 4096 and 1 to 512")
