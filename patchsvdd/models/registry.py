"""The models the project trains, by name: one line each in ``REGISTRY``.

A line names the model, the module and class of its ``ModelFamily`` (see
``base.py``: everything the trainer, evaluator, bundles, inspector and the
federated tasks ask of a model), its held-out criterion, its default recipe
(a name in ``settings.RECIPES``) and the dataclass of its own options (see
``options.py``). Adding a model is one new folder under ``models/`` and one
line here. Standard library only: the settings and the envoy side read the
names and options without torch; a family loads on first use.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import import_module
from typing import TYPE_CHECKING, Any

from patchsvdd.errors import SettingsError
from patchsvdd.models.options import options_from_dict

if TYPE_CHECKING:  # the families need torch; this module does not
    from torch import nn

    from patchsvdd.models.base import ModelFamily


@dataclass(frozen=True)
class ModelEntry:
    """One model: its ``name``, ``family`` ('module:Class'), its ``heldout_metric`` (the loss on held-out good
    images that chooses a model without any anomaly; lower is better), its default ``recipe`` and ``options``
    ('module:Class' of the frozen dataclass of its own options, in a module without torch)."""

    name: str
    family: str
    heldout_metric: str
    recipe: str
    options: str = "patchsvdd.models.options:NoOptions"


REGISTRY: dict[str, ModelEntry] = {
    entry.name: entry
    for entry in (
        ModelEntry(
            "patchsvdd",
            "patchsvdd.models.patchsvdd.family:PatchSVDDFamily",
            "heldout_pos",
            "cpu",
            "patchsvdd.models.patchsvdd.options:PatchSVDDOptions",
        ),
        ModelEntry(
            "autoencoder",
            "patchsvdd.models.autoencoder.family:AutoencoderFamily",
            "heldout_rec",
            "autoencoder",
            "patchsvdd.models.autoencoder.options:AutoencoderOptions",
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


def _attribute(spec: str) -> Any:
    module, _, name = spec.partition(":")
    return getattr(import_module(module), name)


@cache
def _load(spec: str) -> ModelFamily[Any]:
    return _attribute(spec)()


def family(name: str) -> ModelFamily[Any]:
    """The ``ModelFamily`` of the model called ``name`` (loaded once)."""
    return _load(entry(name).family)


def options_class(name: str) -> type:
    """The dataclass of the model ``name``'s own options (``PatchSVDDOptions``, ...)."""
    return _attribute(entry(name).options)


def model_options(name: str, values: object = None) -> Any:
    """The options of model ``name``: its defaults with ``values`` (a mapping of some of its option names, from
    a user or a manifest) put in; SettingsError naming the model and the option for any other name, type or
    range."""
    return options_from_dict(options_class(name), {} if values is None else values, name)


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


def build_model(kind: str = "patchsvdd", *, channels: int = 3, **options: Any) -> nn.Module:
    """A fresh model of ``kind`` for images of ``channels`` channels (torch's global RNG draws its weights);
    ``options``: some of the family's own (Patch SVDD: ``emb_dim`` D, ``init``; the autoencoder: ``latent_dim``,
    ``width``), the rest its defaults."""
    return family(kind).build(model_options(kind, options), channels=channels)


def describe(model: nn.Module) -> str:
    """One line: what the model is and its size (``print(model)`` lists its layers)."""
    return family_of(model).describe(model)
