"""Patch SVDD anomaly detection for MVTec-layout data, trained locally or federated with OpenFL.

Torch-free parts (``patchsvdd.data.mvtec``, ``patchsvdd.data.synth``) import without torch, so
envoy-side data access stays light; the torch parts load on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "PatchSVDD": "patchsvdd.models.patchsvdd.network",
    "save_checkpoint": "patchsvdd.training.checkpoint",
    "load_checkpoint": "patchsvdd.training.checkpoint",
    "train_epoch": "patchsvdd.training.loop",
    "make_optimizer": "patchsvdd.training.loop",
    "TrainSettings": "patchsvdd.settings",
    "ExperimentSettings": "patchsvdd.settings",
    "evaluate_category": "patchsvdd.evaluation.evaluate",
    "resolve_device": "patchsvdd.device",
    "import_released": "patchsvdd.models.patchsvdd.released",
    "RECIPES": "patchsvdd.settings",
    "index_category": "patchsvdd.data.mvtec",
    "load_category": "patchsvdd.data.mvtec",
    "MVTecDataError": "patchsvdd.data.mvtec",
    "load_bundle": "patchsvdd.deploy.inspector",
    "Inspector": "patchsvdd.deploy.inspector",
    "export_bundle": "patchsvdd.deploy.export",
    "build_model": "patchsvdd.models.registry",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'patchsvdd' has no attribute {name!r}")
