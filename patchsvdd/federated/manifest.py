"""The experiment manifest: everything a site needs to know about an experiment, as data (JSON), nothing to run.

A client sends ``manifest.json`` in its archive; a site (and the director) builds the model, optimizer, tasks,
data interface and task assigner from its own code and this record (``site_build.py``). The record is read
with limits on its size, its keys, its values and the work they ask of a site:

- ``task``: ``training`` (``training_rounds`` rounds of train + validate, then one validation round),
  ``evaluation`` (validation only: the final metrics, per defect type with ``defect_types``) or ``export``
  (every site writes bundle ``export.name`` in its own bundle folder);
- ``model`` and ``architecture``: a registered model and the numbers that shape it, within the family's
  ``architecture_limits``;
- ``settings``: every field of ``ExperimentSettings``, each of its type and within ``SITE_LIMITS``.

No OpenFL: the director's review and the tests read it as they read any data.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

from patchsvdd.federated.names import ExperimentRefused, check_name, shown
from patchsvdd.models.registry import family, family_of, kind_of, model_names
from patchsvdd.settings import ExperimentSettings, SettingsError, settings_from_dict

FORMAT = "patchsvdd-experiment/1"
MANIFEST_FILE = "manifest.json"
MAX_MANIFEST_BYTES = 64 * 1024
TASKS = ("training", "evaluation", "export")
# Upper bounds of the settings that size a site's work or memory (the paper's are far below each).
SITE_LIMITS = {"rounds": 1000, "repeat": 10_000, "max_steps": 1_000_000, "batch_size": 1024, "warmup_steps": 1_000_000}
MAX_DEFECT_TYPES = 64
KEYS = ("format", "task", "model", "architecture", "settings", "training_rounds", "defect_types", "export")
EXPORT_KEYS = ("name", "bank_fraction", "max_fpr")


@dataclass(frozen=True)
class Export:
    """What every site's export writes: bundle ``name`` keeping ``bank_fraction`` of its training patches,
    thresholds at ``max_fpr`` (None: export's own rule)."""

    name: str
    bank_fraction: float = 1.0
    max_fpr: float | None = None


@dataclass(frozen=True)
class ExperimentManifest:
    """One experiment as data; ``to_json`` is what travels, ``parse_manifest`` what a site reads back."""

    task: str
    model: str
    architecture: dict[str, int]
    settings: ExperimentSettings
    training_rounds: int = 0
    defect_types: tuple[str, ...] | None = None
    export: Export | None = None

    @property
    def rounds_to_train(self) -> int:
        """OpenFL's rounds of this experiment: the training rounds and one validation round."""
        return self.training_rounds + 1

    def to_json(self) -> bytes:
        """The manifest as ``manifest.json`` holds it (ASCII JSON)."""
        record = {
            "format": FORMAT,
            "task": self.task,
            "model": self.model,
            "architecture": dict(self.architecture),
            "settings": self.settings.to_dict(),
            "training_rounds": self.training_rounds,
            "defect_types": None if self.defect_types is None else list(self.defect_types),
            "export": None if self.export is None else asdict(self.export),
        }
        return json.dumps(record, indent=1, sort_keys=True).encode("ascii")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ExperimentRefused(f"its manifest repeats the key {shown(next(k for k in keys if keys.count(k) > 1))}")
    return dict(pairs)


def _no_constant(name: str) -> None:
    raise ExperimentRefused(f"its manifest holds {name}, which is not a number")


def _whole(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _fraction(value: Any, *, high_open: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return 0 < value < 1 if high_open else 0 < value <= 1


def check_settings_limits(settings: ExperimentSettings) -> None:
    """ExperimentRefused when a setting asks more work or memory of a site than ``SITE_LIMITS`` allow."""
    for key, high in SITE_LIMITS.items():
        value = getattr(settings, key)
        if value is not None and value > high:
            raise ExperimentRefused(f"its settings ask {key}={value}, more than a site runs (at most {high})")


def check_architecture(model: str, architecture: Any) -> dict[str, int]:
    """``architecture`` if it names exactly ``model``'s architecture numbers, each within its family's limits."""
    limits = family(model).architecture_limits
    if not isinstance(architecture, dict) or set(architecture) != set(limits):
        keys = sorted(map(str, architecture)) if isinstance(architecture, dict) else type(architecture).__name__
        raise ExperimentRefused(f"its manifest's architecture is {shown(keys)}; a {model} has {sorted(limits)}")
    for key, (low, high) in limits.items():
        if not _whole(architecture[key], low, high):
            raise ExperimentRefused(f"its model's {key} is {shown(architecture[key])}; a {model} has {low}..{high}")
    return dict(architecture)


def _export(value: Any) -> Export:
    if not isinstance(value, dict) or set(value) != set(EXPORT_KEYS):
        raise ExperimentRefused(f"its manifest's export is {shown(value)}, not {{{', '.join(EXPORT_KEYS)}}}")
    if not _fraction(value["bank_fraction"], high_open=False):
        raise ExperimentRefused(f"its export keeps bank_fraction {shown(value['bank_fraction'])}, not in (0, 1]")
    if value["max_fpr"] is not None and not _fraction(value["max_fpr"], high_open=True):
        raise ExperimentRefused(f"its export asks max_fpr {shown(value['max_fpr'])}, not in (0, 1)")
    return Export(check_name(value["name"], "its bundle name"), value["bank_fraction"], value["max_fpr"])


def _defect_types(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not 0 < len(value) <= MAX_DEFECT_TYPES:
        raise ExperimentRefused(f"its manifest's defect_types are {shown(value)}, not a list of 1 to 64 names")
    return tuple(check_name(name, "its defect type") for name in value)


def parse_manifest(data: bytes) -> ExperimentManifest:
    """The manifest in ``data`` (``manifest.json``'s bytes), checked as the module's docstring says; every
    problem is an ExperimentRefused that says which key and why."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ExperimentRefused(f"its manifest has {len(data)} bytes, more than {MAX_MANIFEST_BYTES}")
    try:
        record = json.loads(data.decode("ascii"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ExperimentRefused(f"its manifest is not ASCII JSON ({type(exc).__name__})") from exc
    if not isinstance(record, dict) or set(record) != set(KEYS):
        keys = sorted(map(str, record)) if isinstance(record, dict) else type(record).__name__
        raise ExperimentRefused(f"its manifest has the keys {shown(keys)}, not this project's {list(KEYS)}")
    if record["format"] != FORMAT:
        raise ExperimentRefused(f"its manifest's format is {shown(record['format'])}, not {FORMAT!r}")
    if record["task"] not in TASKS:
        raise ExperimentRefused(f"its manifest's task is {shown(record['task'])}, not one of {', '.join(TASKS)}")
    if record["model"] not in model_names():
        raise ExperimentRefused(f"its model is {shown(record['model'])}, not one of {', '.join(model_names())}")
    model, task = record["model"], record["task"]
    architecture = check_architecture(model, record["architecture"])
    try:
        settings = settings_from_dict(record["settings"])
    except SettingsError as exc:
        raise ExperimentRefused(f"its settings are invalid: {exc}") from exc
    if settings.model != model:
        raise ExperimentRefused(f"its settings are for a {settings.model} but its model is a {model}")
    check_settings_limits(settings)
    rounds = record["training_rounds"]
    expected_rounds = settings.rounds if task == "training" else 0
    if not _whole(rounds, 0, SITE_LIMITS["rounds"]) or rounds != expected_rounds:
        raise ExperimentRefused(
            f"its manifest asks {shown(rounds)} training rounds for {task} (expected {expected_rounds})"
        )
    defect_types = None if record["defect_types"] is None else _defect_types(record["defect_types"])
    if defect_types is not None and task != "evaluation":
        raise ExperimentRefused(f"its manifest lists defect types for {task}, which only evaluation reports")
    if (record["export"] is None) != (task != "export"):
        raise ExperimentRefused(f"its manifest's export is {shown(record['export'])} for {task}")
    export = None if record["export"] is None else _export(record["export"])
    return ExperimentManifest(task, model, architecture, settings, rounds, defect_types, export)


def experiment_manifest(
    model: Any,
    settings: ExperimentSettings,
    task: str,
    defect_types: list[str] | None = None,
    export: Export | None = None,
) -> ExperimentManifest:
    """The manifest of an experiment of ``task`` for ``model`` (its kind must be ``settings.model``)."""
    if kind_of(model) != settings.model:  # the tasks' metrics are the settings' model's
        raise SettingsError(
            f"the model sent is a {kind_of(model)} but settings.model is {settings.model!r}: "
            "set model to match (or start from a checkpoint of that model)"
        )
    model_family = family_of(model)
    return ExperimentManifest(
        task=task,
        model=model_family.name,
        architecture=model_family.architecture(model),
        settings=settings,
        training_rounds=settings.rounds if task == "training" else 0,
        defect_types=None if defect_types is None else tuple(defect_types),
        export=export,
    )
