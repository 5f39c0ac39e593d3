"""The model a site builds for an experiment from its own code and a checked manifest, whatever engine brings
the work, and the one check of the weights a client or an aggregator sends.

The registered family's network of the manifest's architecture is made on the meta device first, so that its
size is known before a byte is allocated (``MAX_PARAMETERS``), then given zeroed memory: the weights of every
round arrive before any task uses them, checked by ``check_weights`` (exactly the model's state-dict keys,
each a float32 array of that key's shape). No engine is imported here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from patchsvdd.federated.manifest import ExperimentManifest
from patchsvdd.federated.names import ExperimentRefused, shown
from patchsvdd.federated.rounds import tagged
from patchsvdd.models.registry import family

MAX_PARAMETERS = 50_000_000  # 200 MB of float32: the largest network a site builds (both models default far below)


def model_shape(manifest: ExperimentManifest) -> nn.Module:
    """The manifest's network, round-tagged, on the meta device (no memory); ExperimentRefused when it would hold
    more than ``MAX_PARAMETERS`` numbers."""
    with torch.device("meta"):
        shape = tagged(family(manifest.model).from_architecture(manifest.architecture))
    size = sum(t.numel() for t in shape.state_dict().values())
    if size > MAX_PARAMETERS:
        raise ExperimentRefused(f"its model would hold {size:,} numbers, more than a site builds ({MAX_PARAMETERS:,})")
    return shape


def site_model(manifest: ExperimentManifest) -> nn.Module:
    """The manifest's network, round-tagged, on the CPU, its weights zero (the aggregator's come next)."""
    model = model_shape(manifest).to_empty(device="cpu")
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.zero_()
    return model


def expected_weights(manifest: ExperimentManifest) -> dict[str, tuple[int, ...]]:
    """{state-dict key: shape} of the manifest's round-tagged network, from its shape alone (nothing allocated)."""
    return {key: tuple(value.shape) for key, value in model_shape(manifest).state_dict().items()}


def check_weights(expected: dict[str, tuple[int, ...]], arrays: Any, sender: str) -> None:
    """ExperimentRefused unless ``arrays`` (from ``sender``: "its initial model", "the aggregator") holds exactly
    the keys of ``expected``, each a float32 array of that key's shape."""
    if not isinstance(arrays, dict) or set(arrays) != set(expected):
        extra = sorted(map(str, set(arrays) - set(expected))) if isinstance(arrays, dict) else []
        missing = sorted(set(expected) - set(arrays)) if isinstance(arrays, dict) else sorted(expected)
        raise ExperimentRefused(
            f"{sender}'s weights are not this model's: extra {shown(extra[:3])}, missing {shown(missing[:3])}"
        )
    for key, shape in expected.items():
        array = arrays[key]
        if not isinstance(array, np.ndarray) or array.dtype != np.float32 or array.shape != shape:
            got = f"{type(array).__name__} {getattr(array, 'dtype', '')} {getattr(array, 'shape', '')}".strip()
            raise ExperimentRefused(f"{sender}'s weights for {key!r} are {got}, not float32 of shape {shape}")
