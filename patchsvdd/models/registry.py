"""The two models the project trains, by name: 'patchsvdd' (the method) and 'autoencoder' (the baseline).

Building one, telling which one a network is, the architecture a checkpoint
records, and what each reports: its map fusions and the held-out metric that
chooses a model without any anomalous image.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from patchsvdd.models.patchsvdd import scoring
from patchsvdd.models.autoencoder.network import FUSIONS as AUTOENCODER_FUSIONS
from patchsvdd.models.autoencoder.network import ConvAutoencoder
from patchsvdd.models.patchsvdd.network import PatchSVDD, count_parameters
from patchsvdd.models.patchsvdd.network import describe as describe_patchsvdd
from patchsvdd.settings import EMB_DIM, HELDOUT_METRICS, MODELS, SettingsError

FUSIONS = {"patchsvdd": scoring.FUSIONS, "autoencoder": AUTOENCODER_FUSIONS}
__all__ = ["FUSIONS", "HELDOUT_METRICS", "architecture", "build_model", "check_kind", "describe", "from_architecture",
           "kind_of"]


def check_kind(kind: str) -> str:
    """``kind`` if it names a model, else a SettingsError listing them."""
    if kind not in MODELS:
        raise SettingsError(f"model {kind!r}: choose {' or '.join(MODELS)}")
    return kind


def build_model(kind: str = "patchsvdd", *, emb_dim: int = EMB_DIM, init: str = "kaiming", channels: int = 3) -> nn.Module:
    """A fresh model (torch's global RNG draws its weights). Patch SVDD uses ``emb_dim`` (D) and ``init``;
    the autoencoder ``channels`` (1 for grayscale data, 3 for RGB) and PyTorch's default initialisation."""
    if check_kind(kind) == "autoencoder":
        return ConvAutoencoder(channels=channels)
    return PatchSVDD(emb_dim=emb_dim, init=init)


def kind_of(model: nn.Module) -> str:
    """'patchsvdd' or 'autoencoder'; TypeError for any other network."""
    if isinstance(model, PatchSVDD):
        return "patchsvdd"
    if isinstance(model, ConvAutoencoder):
        return "autoencoder"
    raise TypeError(f"{type(model).__name__} is neither a PatchSVDD nor a ConvAutoencoder")


def architecture(model: nn.Module) -> dict[str, int]:
    """The numbers that rebuild ``model``'s shape (what a checkpoint records)."""
    if kind_of(model) == "autoencoder":
        return {"channels": model.channels, "latent_dim": model.latent_dim, "width": model.width}
    return {"emb_dim": int(model.emb_dim)}


def from_architecture(kind: str, numbers: dict[str, Any]) -> nn.Module:
    """An untrained model of the shape ``architecture`` recorded (its weights are to be loaded)."""
    if check_kind(kind) == "autoencoder":
        return ConvAutoencoder(**{k: int(v) for k, v in numbers.items()})
    return PatchSVDD(emb_dim=int(numbers["emb_dim"]), init="pytorch")


def describe(model: nn.Module) -> str:
    """A short text: what the model is, its parameters and its layers."""
    if kind_of(model) == "patchsvdd":
        return describe_patchsvdd(model)
    return (f"convolutional autoencoder, {model.channels} channel(s), latent vector of {model.latent_dim}, "
            f"{count_parameters(model):,} parameters; loss MSE + (1 - SSIM)\n{model}")
