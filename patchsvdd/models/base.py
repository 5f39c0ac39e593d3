"""The one interface every model implements: ``ModelFamily``.

The shared code (``training.loop.train_epoch``, ``evaluation.evaluate``, ``deploy``'s bundles, export and
inspector, the federated tasks, the sites' review and the command line) asks a model's family, found with
``registry.family_of(model)``, and never which model it holds. A family covers:

- the network: build it, the numbers that rebuild its shape (what a checkpoint records), a description;
- inputs from uint8 images (N,H,W,3);
- one training epoch: the step the shared loop runs, and what a federated round reports of it;
- the held-out criterion on good images;
- maps and their fusions for a category, and for one site's inspector;
- what a bundle holds besides the model and thresholds (``SiteState``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Literal, TypeVar

import numpy as np
import torch
from torch import nn

from patchsvdd.settings import TrainSettings

# step(batch image indices (B,), generator, autocast dtype or None) -> (loss to minimise, the step's values by name)
Step = Callable[[torch.Tensor, torch.Generator, "torch.dtype | None"], "tuple[torch.Tensor, dict[str, float]]"]
SearchMode = Literal["exact", "fast"]  # a category's search: exact or approximate nearest neighbours
BankSearch = Literal["auto", "exact", "fast"]  # how a site scorer searches its banks, where it has any
ArrayReader = Callable[[str], np.ndarray]  # a bundle's array by file name (BundleError naming the file if unreadable)


@dataclass(frozen=True)
class Scoring:
    """How a category's test images are scored, where a family has a choice (each reads what applies to it;
    the autoencoder none): ``mean`` (H,W,3) standardises the images (Patch SVDD; None: the training images'),
    ``search`` of nearest neighbours, ``batch_size`` images per forward pass, a ``progress`` bar."""

    mean: np.ndarray | None = None
    search: SearchMode = "exact"
    batch_size: int = 8
    progress: bool = False


@dataclass
class CategoryScores:
    """Anomaly maps (M,H,W) for each of a model's fusions and the seconds each phase took."""

    maps: dict[str, torch.Tensor]
    seconds: dict[str, float]

    def image_scores(self, fusion: str) -> torch.Tensor:
        """Image score = maximum of the map: (M,)."""
        return self.maps[fusion].flatten(1).amax(dim=1)


@dataclass
class EpochSteps:
    """What the shared loop needs to train a model for one epoch: ``step`` (see ``Step``) over ``n_images``
    inputs, the values its progress bar shows, and ``check(global_step, values)`` run after every step
    (e.g. Patch SVDD's collapse check; it raises to stop)."""

    step: Step
    n_images: int
    shown: Sequence[str] = ()
    check: Callable[[int, dict[str, float]], None] | None = None


@dataclass
class SiteState:
    """What a site's bundle holds besides the model and thresholds, from the site's good images: Patch SVDD's
    training ``mean`` (H,W,3) float32 and memory ``banks`` {K: (P,D) float32}; the autoencoder's error
    ``scales`` (in ``bundle.json``)."""

    mean: np.ndarray | None = None
    banks: dict[int, np.ndarray] = field(default_factory=dict)
    scales: dict[str, float] | None = None


class SiteScorer(ABC):
    """Maps new images at a site from its ``SiteState`` (indexes built once); ``search``: how it searches
    (Patch SVDD: 'exact' or 'fast'; 'none' for a model without banks)."""

    search: str = "none"

    @abstractmethod
    def maps(self, images: np.ndarray) -> np.ndarray:
        """uint8 images (N,256,256,3) -> anomaly maps (N,256,256) float32 (the 'sum' fusion)."""


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


ModelT = TypeVar("ModelT", bound=nn.Module)


class ModelFamily(ABC, Generic[ModelT]):
    """One model, as the shared code uses it (one instance per model, made by the registry); ``ModelT`` is
    the class of its networks."""

    name: ClassVar[str]  # its registry name
    network: ClassVar[type[nn.Module]]  # the class of its networks
    fusions: ClassVar[tuple[str, ...]]  # the maps its evaluation reports, 'sum' among them
    train_metrics: ClassVar[tuple[str, ...]]  # what a federated round's training reports ('train_loss' first)
    # the range of each architecture number: what a site builds from an experiment's manifest
    architecture_limits: ClassVar[dict[str, tuple[int, int]]]
    # state-dict prefixes of the parts that train but never score, which a site may keep to itself (local_heads)
    site_heads: ClassVar[tuple[str, ...]] = ()

    @property
    def heldout_metric(self) -> str:
        """The name of its held-out criterion (the registry's)."""
        from patchsvdd.models.registry import entry

        return entry(self.name).heldout_metric

    def options(self, values: object = None) -> Any:
        """Its own options (the registry's dataclass): the defaults with ``values`` put in (see
        ``registry.model_options``)."""
        from patchsvdd.models.registry import model_options

        return model_options(self.name, values)

    # --- the network -------------------------------------------------------------------------------------------

    @abstractmethod
    def build(self, options: Any, *, channels: int = 3) -> ModelT:
        """A fresh network of its own ``options`` (its options dataclass) for images of ``channels`` channels."""

    @abstractmethod
    def architecture(self, model: ModelT) -> dict[str, int]:
        """The numbers that rebuild ``model``'s shape (what a checkpoint records)."""

    @abstractmethod
    def from_architecture(self, numbers: dict[str, int]) -> ModelT:
        """An untrained network of the shape ``architecture`` recorded (its weights are to be loaded)."""

    @abstractmethod
    def describe(self, model: ModelT) -> str:
        """One line: what the model is and its size (``print(model)`` lists its layers)."""

    # --- training ----------------------------------------------------------------------------------------------

    @abstractmethod
    def inputs(self, model: ModelT, images: np.ndarray, mean: np.ndarray) -> torch.Tensor:
        """uint8 images (N,H,W,3) as ``model`` trains on them; ``mean`` (H,W,3) is the site's training mean."""

    @abstractmethod
    def epoch_steps(self, model: ModelT, inputs: torch.Tensor, recipe: TrainSettings, options: Any) -> EpochSteps:
        """The step of one epoch over ``inputs`` (from ``inputs``, moved to the model's device) with ``recipe``
        and its own ``options`` (those that shape training, e.g. Patch SVDD's lambda)."""

    @abstractmethod
    def round_report(self, losses: dict[str, float]) -> dict[str, float]:
        """The ``train_metrics`` of an epoch's mean values (what ``epoch_steps``' values averaged to)."""

    @abstractmethod
    def epoch_line(self, losses: dict[str, float]) -> str:
        """One line about an epoch's mean values, for the command line."""

    @abstractmethod
    def heldout(self, model: ModelT, inputs: torch.Tensor) -> float:
        """The held-out criterion (lower is better) on held-out good images, as ``inputs`` makes them."""

    # --- maps ------------------------------------------------------------------------------------------------

    @abstractmethod
    def category_maps(
        self, model: ModelT, train_images: np.ndarray, test_images: np.ndarray, scoring: Scoring
    ) -> CategoryScores:
        """Maps (M,H,W) of each fusion of uint8 test images (M,H,W,3), against the good training images
        (N,H,W,3), scored as ``scoring`` says where the family has a choice, and the seconds each phase took."""

    @abstractmethod
    def site_state(
        self, model: ModelT, good_images: np.ndarray, mean: np.ndarray, bank_fraction: float, subsample: str
    ) -> SiteState:
        """What a bundle keeps of a site's good images (N,H,W,3) (``bank_fraction`` of the patches, chosen by
        ``subsample``, where the model keeps patches)."""

    def site_states(
        self, model: ModelT, good_images: np.ndarray, mean: np.ndarray, bank_fractions: Sequence[float], subsample: str
    ) -> list[SiteState]:
        """``site_state`` for each of ``bank_fractions`` (a family may share the work between them)."""
        return [self.site_state(model, good_images, mean, fraction, subsample) for fraction in bank_fractions]

    def add_good(
        self,
        model: ModelT,
        state: SiteState,
        good_images: np.ndarray,
        n_images: int,
        bank_fraction: float,
        subsample: str,
    ) -> SiteState:
        """``state`` (made from ``n_images`` good images) taught more confirmed good images (M,H,W,3) without
        training, keeping its bank's size policy. A family that keeps no patches cannot: ValueError."""
        raise ValueError(f"a {self.name} bundle keeps no memory bank: confirmed good images cannot be added to it")

    @abstractmethod
    def state_fields(self, model: ModelT, state: SiteState) -> dict:
        """The family's own fields of ``bundle.json``."""

    @abstractmethod
    def read_state(self, model: ModelT, fields: dict, read_array: ArrayReader) -> SiteState:
        """The ``SiteState`` of a bundle from its ``bundle.json`` fields and arrays; ValueError starting with the
        file's name ('mean.npy: ...') when one does not fit."""

    @abstractmethod
    def site_scorer(self, model: ModelT, state: SiteState, search: BankSearch) -> SiteScorer:
        """What a site's inspector maps images with (on the model's device; ``search`` where it applies:
        'auto', 'exact' or 'fast')."""
