"""Every default of the project in one place: the training recipe and the federated experiment.

``TrainSettings`` is a training recipe (what ``patchsvdd train`` and the envoys'
training task use); ``ExperimentSettings`` is a federated experiment: the
recipe plus rounds, model choice (with the model's own options, a dataclass of its
family: ``models/*/options.py``) and search. The notebook's parameter cell, the
demo's command line and the CLI take their defaults from these dataclasses, and
a test checks that the notebook's parameter cell agrees field for field.
Standard library only: the envoy side, the demo and the CLI's help read it
without torch or OpenFL.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from patchsvdd.errors import SettingsError
from patchsvdd.models.options import has_type
from patchsvdd.models.registry import REGISTRY, model_options

MODELS = tuple(REGISTRY)  # the registered models (models/registry.py)
# each model's criterion on held-out good images, which chooses the best model without any anomaly (lower is better)
HELDOUT_METRICS = {name: entry.heldout_metric for name, entry in REGISTRY.items()}
PRECISIONS = ("auto", "fp32", "bf16")  # see training.loop.resolve_precision
SCHEDULES = ("cosine", "constant")
SEARCHES = ("exact", "fast")
FINAL_MODELS = ("best", "last")
DEVICE_POLICIES = ("CUDA_PREFERRED", "CPU_ONLY")


@dataclass(frozen=True)
class LRSchedule:
    """Learning rate per global step: linear warm-up from 0 over ``warmup_steps``, then constant
    (``total_steps`` None) or cosine decay to ``final_fraction`` * ``base_lr`` at ``total_steps``."""

    base_lr: float = 1e-3
    warmup_steps: int = 0
    total_steps: int | None = None
    final_fraction: float = 0.1

    def lr_at(self, step: int) -> float:
        """Learning rate of global step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        if self.total_steps is None:
            return self.base_lr
        done = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.base_lr * (self.final_fraction + (1 - self.final_fraction) * 0.5 * (1 + math.cos(math.pi * done)))


def _choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise SettingsError(f"{name}={value!r}: choose {', '.join(map(str, choices))}")


@dataclass(frozen=True)
class TrainSettings:
    """A training recipe, whatever the model: Adam's ``lr`` with ``warmup_steps`` of linear warm-up and a
    ``schedule``, ``batch_size`` samples per step (Patch SVDD: pairs per loss, B), each training image used
    ``repeat`` times per epoch, autocast ``precision``. The defaults are the project's CPU recipe, measured on
    real bottle (docs/benchmarks.md): lr 1e-3 with 100 warm-up steps and a cosine decay to a tenth, bf16 where
    the hardware has it. ``PAPER_SETTINGS`` is the published one. A model's own options (Patch SVDD's lambda and
    initialisation) are its family's (``models/*/options.py``).
    """

    lr: float = 1e-3
    batch_size: int = 64
    repeat: int = 100
    warmup_steps: int = 100
    schedule: str = "cosine"
    precision: str = "auto"

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise SettingsError(f"lr={self.lr}: must be positive")
        if self.batch_size < 1 or self.repeat < 1 or self.warmup_steps < 0:
            raise SettingsError(
                f"batch_size={self.batch_size}, repeat={self.repeat}, warmup_steps={self.warmup_steps}: "
                "batch and repeat at least 1, warm-up not negative"
            )
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("precision", self.precision, PRECISIONS)

    def lr_schedule(self, total_steps: int | None) -> LRSchedule:
        """The learning rate per global step for a run of ``total_steps`` steps (needed for 'cosine')."""
        cosine = self.schedule == "cosine" and total_steps is not None
        return LRSchedule(self.lr, self.warmup_steps, total_steps if cosine else None)

    def steps_per_epoch(self, n_images: int, max_steps: int | None = None) -> int:
        """Optimizer steps of one epoch over ``n_images`` images (cut to ``max_steps`` when given)."""
        steps = math.ceil(n_images * self.repeat / self.batch_size)
        return steps if max_steps is None else min(steps, max_steps)


PAPER_SETTINGS = TrainSettings(lr=1e-4, warmup_steps=0, schedule="constant", precision="fp32")
# The autoencoder baseline: Adam lr 1e-3, whole images in batches of 16, one pass per epoch, cosine decay.
AUTOENCODER_SETTINGS = TrainSettings(lr=1e-3, batch_size=16, repeat=1, warmup_steps=0)
RECIPES = {"cpu": TrainSettings(), "paper": PAPER_SETTINGS, "autoencoder": AUTOENCODER_SETTINGS}
# what a recipe also sets of a model's own options, by model: the paper's code keeps PyTorch's initialisation
RECIPE_MODEL_OPTIONS: dict[str, dict[str, dict[str, Any]]] = {"paper": {"patchsvdd": {"init": "pytorch"}}}


def recipe_options(recipe: str, model: str) -> dict[str, Any]:
    """What the recipe called ``recipe`` sets of ``model``'s own options (a mapping of some of them)."""
    return dict(RECIPE_MODEL_OPTIONS.get(recipe, {}).get(model, {}))


DEFAULT_RECIPE = {name: entry.recipe for name, entry in REGISTRY.items()}  # each model's recipe unless one is named
_TRAIN = TrainSettings()


@dataclass(frozen=True)
class ExperimentSettings:
    """A federated experiment: the training recipe and the federation's own.

    The defaults (the notebook's) are a first run of minutes on a CPU: 2 rounds of 40 steps at batch 32 per
    envoy, 40 warm-up steps, the rest of the recipe as ``TrainSettings``. It shows the whole path (training,
    FedAvg, validation, evaluation, bundles); a model that clearly beats the untrained encoder needs many more
    steps (``LEARN_BUDGET``; the figures: docs/benchmarks.md, "The demo").

    ``model``: 'patchsvdd' or 'autoencoder' (the baseline, see ``autoencoder``; it chooses its best model by
    'heldout_rec', its loss on the held-out images). ``model_options``: some of that model's own options (its
    family's dataclass: Patch SVDD's ``emb_dim``, ``init``, ``lambda_svdd``; the autoencoder's ``latent_dim``,
    ``width``), the rest at their defaults; ``options()`` gives them all.

    ``repeat``/``max_steps``: each training image is used ``repeat`` times per round, cut to ``max_steps``
    steps when set; the learning-rate schedule runs over all rounds. ``holdout_fraction``: share of each
    envoy's good training images kept out of training; the position loss on them ('heldout_pos', lower is
    better) chooses the best model without any anomaly. ``round_search``/``final_search``: nearest-neighbour
    search of the per-round validation and of the final evaluation. ``final_model``: the model the final
    evaluation scores. ``idle_timeout``: seconds without any metric before giving up. ``offline_grace``:
    seconds an envoy may be offline during an experiment (a dropped link) before the notebook gives up
    (0: at once). ``aggregator_port``:
    the port of the aggregator the director starts for each experiment, which every envoy must reach
    (None: OpenFL's choice, from a hash of the plan, somewhere in 49152-60998).

    Remedies for sites that differ (docs/federation-value.md): ``proximal_mu`` (FedProx's mu; 0: plain FedAvg)
    adds mu/2 * ||w - w_round||^2 to every step's loss, w_round the weights the round started with;
    ``local_heads`` keeps each site's own position classifiers (the parts that train but never score; the
    family's ``site_heads``) across rounds instead of the averaged ones, so that only the encoder is shared.

    ``secure_aggregation``: the sites' trained weights reach the data scientist only as their weighted mean
    (Flower's SecAgg+; Flower only: OpenFL 1.7.1 has none; docs/security.md).
    """

    model: str = "patchsvdd"
    rounds: int = 2
    repeat: int = _TRAIN.repeat
    max_steps: int | None = 40
    batch_size: int = 32
    lr: float = _TRAIN.lr
    warmup_steps: int = 40
    schedule: str = _TRAIN.schedule
    precision: str = _TRAIN.precision
    model_options: dict[str, Any] = field(default_factory=dict)
    holdout_fraction: float = 0.1
    device_policy: str = "CUDA_PREFERRED"
    round_search: str = "fast"
    final_search: str = "exact"
    final_model: str = "best"
    seed: int = 0
    idle_timeout: float = 900.0
    offline_grace: float = 180.0
    aggregator_port: int | None = 50051
    proximal_mu: float = 0.0
    local_heads: bool = False
    secure_aggregation: bool = False

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise SettingsError(f"rounds={self.rounds}: at least one round")
        if self.max_steps is not None and self.max_steps < 1:
            raise SettingsError(f"max_steps={self.max_steps}: at least 1 (None for whole epochs)")
        if not 0 <= self.holdout_fraction < 1:
            raise SettingsError(f"holdout_fraction={self.holdout_fraction}: from 0 (none) to below 1")
        if not self.idle_timeout > 0:
            raise SettingsError(f"idle_timeout={self.idle_timeout}: must be positive")
        if not 0 <= self.offline_grace < math.inf:
            raise SettingsError(f"offline_grace={self.offline_grace}: seconds, 0 (give up at once) or more")
        if not 0 <= self.proximal_mu < math.inf:
            raise SettingsError(f"proximal_mu={self.proximal_mu}: 0 (plain FedAvg) or more")
        if self.aggregator_port is not None and not 0 < self.aggregator_port < 65536:
            raise SettingsError(f"aggregator_port={self.aggregator_port}: a TCP port (1-65535) or None")
        _choice("model", self.model, tuple(REGISTRY))  # read live: a model registered later is a choice too
        _choice("device_policy", self.device_policy, DEVICE_POLICIES)
        _choice("round_search", self.round_search, SEARCHES)
        _choice("final_search", self.final_search, SEARCHES)
        _choice("final_model", self.final_model, FINAL_MODELS)
        self.train_settings()  # checks the training part
        if not isinstance(self.model_options, dict):
            raise SettingsError(f"model_options={self.model_options!r:.40}: a mapping of the model's option names")
        object.__setattr__(self, "model_options", dict(self.model_options))  # a copy: later edits do not reach it
        self.options()  # checks the model's own options

    def train_settings(self) -> TrainSettings:
        """The training part of these settings."""
        return TrainSettings(**{f.name: getattr(self, f.name) for f in fields(TrainSettings)})

    def options(self) -> Any:
        """The model's own options (its family's dataclass): its defaults with ``model_options`` put in."""
        return model_options(self.model, self.model_options)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, for checkpoint metadata and reports."""
        return asdict(self)


def settings_from_dict(values: object) -> ExperimentSettings:
    """ExperimentSettings from a plain mapping (a manifest's JSON), if it names exactly the fields, each of its
    declared type and finite, and the settings' checks pass; SettingsError naming the field otherwise."""
    if not isinstance(values, dict):
        raise SettingsError(f"the settings are a {type(values).__name__}, not a mapping of ExperimentSettings' fields")
    names = {f.name: f.type for f in fields(ExperimentSettings)}
    if set(values) != set(names):
        raise SettingsError(
            f"the settings have the fields {sorted(map(str, set(values) ^ set(names)))[:5]} beyond or without "
            "ExperimentSettings' own"
        )
    for name, hint in names.items():
        if name == "model_options":  # a mapping, checked against the model's own dataclass in __post_init__
            if not (isinstance(values[name], dict) and all(isinstance(key, str) for key in values[name])):
                raise SettingsError(f"settings.model_options is {values[name]!r:.40}, not a mapping of option names")
        elif not has_type(values[name], str(hint)):
            raise SettingsError(f"settings.{name} is {values[name]!r:.40}, not of type {hint}")
    if any(isinstance(v, float) and not math.isfinite(v) for v in values.values()):
        raise SettingsError("the settings hold a number that is not finite")
    return ExperimentSettings(**values)  # __post_init__: every range and choice


def checked_settings(value: object) -> ExperimentSettings:
    """``value`` if it is an ExperimentSettings whose every field has its declared type and whose checks pass
    again (an object made without ``__init__`` skips ``__post_init__``); SettingsError naming the field
    otherwise."""
    if type(value) is not ExperimentSettings:
        raise SettingsError(f"the settings are a {type(value).__name__}, not ExperimentSettings")
    return settings_from_dict(dict(vars(value)))


# The demo: the notebook's defaults (a first run of minutes) with fast search and a shorter idle timeout.
DEMO_SETTINGS = replace(ExperimentSettings(), final_search="fast", idle_timeout=600.0)
# The budget at which the demo's model beats the untrained encoder clearly (aggregated det_sum +0.2 on the demo
# data): 5 rounds of 240 steps at batch 32 per envoy, each round an epoch of the envoy's 27 fitting images used
# 300 times, cut to 240 (make demo-learn; docs/benchmarks.md, "The demo").
LEARN_BUDGET = {"rounds": 5, "repeat": 300, "max_steps": 240}
# The demo's data (synth.generate_category's arguments): washer images of seed 0, 60 for training and 120 for
# testing (40 good, 20 of each of the 4 defect types), i.e. 30 training, 20 good and 40 defective test images
# per envoy: few enough that scoring them every round costs under a minute on one core.
DEMO_DATA = {"seed": 0, "n_train": 60, "n_test_good": 40, "n_test_per_defect": 20, "image_size": 320}
# Fine-tuning a trained encoder (a released one): small and few steps keep what it knows (5 rounds of 80;
# docs/benchmarks.md, "Fine-tuning the released encoder across two sites").
FINETUNE = {"rounds": 5, "lr": 1e-5, "warmup_steps": 0, "repeat": 100, "max_steps": 80}
