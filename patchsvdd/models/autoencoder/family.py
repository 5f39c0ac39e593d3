"""The autoencoder baseline as the shared code uses it (``ModelFamily``): images in [0,1], MSE + (1 - SSIM),
and maps from the reconstruction error (fusions l2, ssim, sum on the site's scales); no memory bank."""

from __future__ import annotations

import time

import numpy as np
import torch

from patchsvdd.models.autoencoder.network import FUSIONS, ConvAutoencoder, as_input, good_scales, image_maps
from patchsvdd.models.autoencoder.options import AutoencoderOptions
from patchsvdd.models.autoencoder.training import epoch_steps, heldout_reconstruction
from patchsvdd.models.base import (
    BankSearch,
    CategoryScores,
    EpochSteps,
    ModelFamily,
    Scoring,
    SiteScorer,
    SiteState,
    count_parameters,
)
from patchsvdd.settings import TrainSettings

SCALE_NAMES = ("l2", "ssim")


class ReconstructionScorer(SiteScorer):
    """A site's maps: both reconstruction errors in units of their mean on the site's good images, summed."""

    def __init__(self, model: ConvAutoencoder, scales: dict[str, float], batch_size: int = 8) -> None:
        self.model, self.scales, self.batch_size = model, scales, batch_size

    @torch.no_grad()
    def maps(self, images: np.ndarray) -> np.ndarray:
        return image_maps(self.model, images, self.scales, self.batch_size)["sum"].numpy().astype(np.float32)


class AutoencoderFamily(ModelFamily[ConvAutoencoder]):
    name = "autoencoder"
    network = ConvAutoencoder
    fusions = FUSIONS
    train_metrics = ("train_loss", "mse", "ssim")
    architecture_limits = {"channels": (1, 3), "latent_dim": (1, 4096), "width": (1, 512)}

    def build(self, options: AutoencoderOptions, *, channels: int = 3) -> ConvAutoencoder:
        # PyTorch's default initialisation; 1 channel for gray data
        return ConvAutoencoder(channels=channels, latent_dim=options.latent_dim, width=options.width)

    def architecture(self, model: ConvAutoencoder) -> dict[str, int]:
        return {"channels": model.channels, "latent_dim": model.latent_dim, "width": model.width}

    def from_architecture(self, numbers: dict[str, int]) -> ConvAutoencoder:
        return ConvAutoencoder(**{k: int(v) for k, v in numbers.items()})

    def describe(self, model: ConvAutoencoder) -> str:
        return (
            f"convolutional autoencoder, {model.channels} channel(s), latent vector of {model.latent_dim}, "
            f"{count_parameters(model):,} parameters; loss MSE + (1 - SSIM)"
        )

    def inputs(self, model: ConvAutoencoder, images: np.ndarray, mean: np.ndarray) -> torch.Tensor:
        """(N,C,H,W) float32 in [0,1] with the model's C channels (``mean`` unused)."""
        return as_input(images, model.channels)

    def epoch_steps(
        self, model: ConvAutoencoder, inputs: torch.Tensor, recipe: TrainSettings, options: AutoencoderOptions
    ) -> EpochSteps:
        return epoch_steps(model, inputs)

    def round_report(self, losses: dict[str, float]) -> dict[str, float]:
        return {"train_loss": losses["loss"], "mse": losses["mse"], "ssim": losses["ssim"]}

    def epoch_line(self, losses: dict[str, float]) -> str:
        return f"loss {losses['loss']:.4f} (MSE {losses['mse']:.5f}, SSIM {losses['ssim']:.4f})"

    def heldout(self, model: ConvAutoencoder, inputs: torch.Tensor) -> float:
        return heldout_reconstruction(model, inputs)[self.heldout_metric]

    def category_maps(
        self, model: ConvAutoencoder, train_images: np.ndarray, test_images: np.ndarray, scoring: Scoring
    ) -> CategoryScores:
        """The good training images set the scale of each error for 'sum' (nothing of ``scoring`` applies)."""
        start = time.perf_counter()
        scales = good_scales(model, train_images)
        seconds = {"scales": time.perf_counter() - start}
        start = time.perf_counter()
        maps = image_maps(model, test_images, scales)
        seconds["reconstruct"] = time.perf_counter() - start
        return CategoryScores(maps=maps, seconds=seconds)

    def site_state(
        self, model: ConvAutoencoder, good_images: np.ndarray, mean: np.ndarray, bank_fraction: float, subsample: str
    ) -> SiteState:
        return SiteState(scales=good_scales(model.eval(), good_images))  # no bank: only the scale of each error

    def state_fields(self, model: ConvAutoencoder, state: SiteState) -> dict:
        return {"scales": state.scales}

    def read_state(self, model: ConvAutoencoder, fields: dict, read_array) -> SiteState:
        scales = fields.get("scales")
        if not isinstance(scales, dict) or not all(
            isinstance(scales.get(n), (int, float)) and scales[n] > 0 for n in SCALE_NAMES
        ):
            raise ValueError(f"bundle.json: 'scales' {scales!r}: expected positive numbers 'l2' and 'ssim'")
        return SiteState(scales=dict(scales))

    def site_scorer(self, model: ConvAutoencoder, state: SiteState, search: BankSearch) -> SiteScorer:
        return ReconstructionScorer(model, state.scales or {})
