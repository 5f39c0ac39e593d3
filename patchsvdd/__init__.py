"""Patch SVDD anomaly detection for MVTec-layout data, trained locally or federated with OpenFL.

Torch-free parts (``patchsvdd.data``, ``patchsvdd.synth``) import without torch, so
envoy-side data access stays light; the torch parts load on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "PatchSVDD": "patchsvdd.model",
    "save_checkpoint": "patchsvdd.checkpoint",
    "load_checkpoint": "patchsvdd.checkpoint",
    "train_epoch": "patchsvdd.train",
    "make_optimizer": "patchsvdd.train",
    "TrainSettings": "patchsvdd.settings",
    "ExperimentSettings": "patchsvdd.settings",
    "evaluate_category": "patchsvdd.evaluate",
    "resolve_device": "patchsvdd.device",
    "import_released": "patchsvdd.released",
    "RECIPES": "patchsvdd.settings",
    "index_category": "patchsvdd.data",
    "load_category": "patchsvdd.data",
    "MVTecDataError": "patchsvdd.data",
    "load_bundle": "patchsvdd.inspector",
    "Inspector": "patchsvdd.inspector",
    "export_bundle": "patchsvdd.inspector",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'patchsvdd' has no attribute {name!r}")
