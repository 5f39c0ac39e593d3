"""A toy model: a 1x1 convolution that learns to predict each pixel's colour from a blurred copy of the image;
its anomaly map is the squared prediction error. It exists to show that the shared code needs nothing else."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from patchsvdd.models.base import CategoryScores, EpochSteps, ModelFamily, Scoring, SiteScorer, SiteState
from patchsvdd.settings import TrainSettings


class ColourNet(nn.Module):
    """(N,3,H,W) in [0,1] -> predicted colours (N,3,H,W) from a 9x9 box blur of the image."""

    def __init__(self, hidden: int = 4) -> None:
        super().__init__()
        self.hidden = hidden
        self.layers = nn.Sequential(nn.Conv2d(3, hidden, 1), nn.Tanh(), nn.Conv2d(hidden, 3, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(F.avg_pool2d(images, 9, stride=1, padding=4, count_include_pad=False))


def error_maps(model: ColourNet, images: np.ndarray) -> torch.Tensor:
    """uint8 images (N,H,W,3) -> squared error maps (N,H,W)."""
    device = next(model.parameters()).device
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255).to(device)
    with torch.no_grad():
        return (model(x) - x).pow(2).sum(dim=1).cpu()


class ErrorScorer(SiteScorer):
    def __init__(self, model: ColourNet) -> None:
        self.model = model

    def maps(self, images: np.ndarray) -> np.ndarray:
        return error_maps(self.model, images).numpy().astype(np.float32)


class ToyFamily(ModelFamily):
    name = "toy"
    network = ColourNet
    fusions = ("sum",)
    train_metrics = ("train_loss",)
    architecture_limits = {"hidden": (1, 64)}

    def build(self, options: Any, *, channels: int = 3) -> nn.Module:
        return ColourNet()

    def architecture(self, model: nn.Module) -> dict[str, int]:
        return {"hidden": model.hidden}

    def from_architecture(self, numbers: dict[str, int]) -> nn.Module:
        return ColourNet(hidden=int(numbers["hidden"]))

    def describe(self, model: nn.Module) -> str:
        return f"toy colour predictor, {model.hidden} hidden channels"

    def inputs(self, model: nn.Module, images: np.ndarray, mean: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)

    def epoch_steps(self, model: nn.Module, inputs: torch.Tensor, recipe: TrainSettings, options: Any) -> EpochSteps:
        device = next(model.parameters()).device
        inputs = inputs.to(device)
        model.train()

        def step(index: torch.Tensor, generator: torch.Generator, autocast_dtype: torch.dtype | None):
            batch = inputs[index.to(device)]
            loss = (model(batch) - batch).pow(2).mean()
            return loss, {"loss": float(loss.detach())}

        return EpochSteps(step=step, n_images=inputs.shape[0], shown=("loss",))

    def round_report(self, losses: dict[str, float]) -> dict[str, float]:
        return {"train_loss": losses["loss"]}

    def epoch_line(self, losses: dict[str, float]) -> str:
        return f"loss {losses['loss']:.5f}"

    def heldout(self, model: nn.Module, inputs: torch.Tensor) -> float:
        device = next(model.parameters()).device
        with torch.no_grad():
            batch = inputs.to(device)
            return float((model(batch) - batch).pow(2).mean())

    def category_maps(
        self, model: nn.Module, train_images: np.ndarray, test_images: np.ndarray, scoring: Scoring
    ) -> CategoryScores:
        return CategoryScores(maps={"sum": error_maps(model, test_images)}, seconds={})

    def site_state(
        self, model: nn.Module, good_images: np.ndarray, mean: np.ndarray, bank_fraction: float, subsample: str
    ) -> SiteState:
        return SiteState()

    def state_fields(self, model: nn.Module, state: SiteState) -> dict:
        return {}

    def read_state(self, model: nn.Module, fields: dict, read_array) -> SiteState:
        return SiteState()

    def site_scorer(self, model: nn.Module, state: SiteState, search: str) -> SiteScorer:
        return ErrorScorer(model)
