"""The models the project trains, by name: one line each in ``REGISTRY``.

A line names the model, the module and class of its ``ModelFamily`` (see
``base.py``: everything the trainer, evaluator, bundles, inspector and the
federated tasks ask of a model), its held-out criterion and its default recipe
(a name in ``settings.RECIPES``). Adding a model is one new folder under
``models/`` and one line here. Standard library only: the settings and the
envoy side read the names without torch; a family loads on first use.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import import_module
from typing import TYPE_CHECKING, Any

from patchsvdd.errors import SettingsError

if TYPE_CHECKING:  # the families need torch; this module does not
    from torch import nn

    from patchsvdd.models.base import ModelFamily


@dataclass(frozen=True)
class ModelEntry:
    """One model: its ``name``, ``family`` ('module:Class'), its ``heldout_metric`` (the loss on held-out good
    images that chooses a model without any anomaly; lower is better) and its default ``recipe``."""

    name: str
    family: str
    heldout_metric: str
    recipe: str


REGISTRY: dict[str, ModelEntry] = {
    entry.name: entry
    for entry in (
        ModelEntry("patchsvdd", "patchsvdd.models.patchsvdd.family:PatchSVDDFamily", "heldout_pos", "cpu"),
        ModelEntry(
            "autoencoder", "patchsvdd.models.autoencoder.family:AutoencoderFamily", "heldout_rec", "autoencoder"
        ),
    )
}


def model_names() -> tuple[str, ...]:
    """The names of the registered models, in registry order."""
    return tuple(REGISTRY)


def entry(name: str) -> ModelEntry:
    """The registry line of ``name``; a SettingsError listing the models for any other name."""
    if name not in REGISTRY:
        raise SettingsError(f"model {name!r}: choose {' or '.join(REGISTRY)}")
    return REGISTRY[name]


@cache
def _load(spec: str) -> ModelFamily[Any]:
    module, _, cls = spec.partition(":")
    return getattr(import_module(module), cls)()


def family(name: str) -> ModelFamily[Any]:
    """The ``ModelFamily`` of the model called ``name`` (loaded once)."""
    return _load(entry(name).family)


def family_of(model: nn.Module) -> ModelFamily[Any]:
    """The family whose network ``model`` is; TypeError for a network no registered model builds."""
    for name in REGISTRY:
        candidate = family(name)
        if isinstance(model, candidate.network):
            return candidate
    raise TypeError(f"{type(model).__name__} is not the network of any registered model ({', '.join(REGISTRY)})")


def kind_of(model: nn.Module) -> str:
    """The registry name of ``model``'s model ('patchsvdd', 'autoencoder', ...)."""
    return family_of(model).name


def build_model(kind: str = "patchsvdd", **options: Any) -> nn.Module:
    """A fresh model of ``kind`` (torch's global RNG draws its weights); ``options`` as that family's
    ``build`` takes them (Patch SVDD: ``emb_dim`` D, ``init``; the autoencoder: ``channels``)."""
    return family(kind).build(**options)


def describe(model: nn.Module) -> str:
    """One line: what the model is and its size (``print(model)`` lists its layers)."""
    return family_of(model).describe(model)
