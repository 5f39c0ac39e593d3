"""A model's own options, checked: each family declares a frozen dataclass of them (standard library only;
each field's ``metadata`` may give its ``help`` and ``choices``, which the command line shows).

Patch SVDD's are ``PatchSVDDOptions`` (``models/patchsvdd/options.py``), the autoencoder's
``AutoencoderOptions``; the registry names each family's class. An experiment carries the chosen family's
values as a plain mapping (``ExperimentSettings.model_options``), which travels in manifests as JSON and is
rebuilt at a site by ``options_from_dict``: exactly the class's field names, each of its declared type and
finite, and the class's own checks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

from patchsvdd.errors import SettingsError

_KINDS: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "str": (str,),
    "bool": (bool,),
    "None": (type(None),),
}


def has_type(value: Any, hint: str) -> bool:
    """Whether ``value`` is of the annotated type ``hint`` ('int', 'float', 'str', 'int | None', ...); a float
    field takes an int, and no numeric field takes a bool; a float must be finite."""
    allowed = tuple(kind for part in hint.split("|") for kind in _KINDS[part.strip()])
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        return False
    return not (isinstance(value, float) and not math.isfinite(value))


@dataclass(frozen=True)
class NoOptions:
    """The options of a model that has none of its own."""


def options_from_dict(options_class: type, values: object, model: str) -> Any:
    """``options_class`` built from ``values``: a mapping of some of its fields (the rest keep their defaults),
    each of its declared scalar type; SettingsError naming the model and the field otherwise."""
    if not (isinstance(options_class, type) and is_dataclass(options_class)):
        raise TypeError(f"{options_class!r} is not a dataclass of options")
    if not isinstance(values, dict):
        raise SettingsError(f"model_options of {model} are a {type(values).__name__}, not a mapping")
    declared = {f.name: str(f.type) for f in fields(options_class)}
    unknown = sorted(map(repr, set(values) - set(declared)))
    if unknown:
        known = ", ".join(declared) or "none"
        raise SettingsError(f"model_options: {model} has no option {', '.join(unknown)[:80]} (its options: {known})")
    for name, value in values.items():
        if not has_type(value, declared[name]):
            raise SettingsError(f"model_options.{name} of {model} is {value!r:.40}, not of type {declared[name]}")
    return options_class(**values)  # __post_init__: the class's ranges and choices
