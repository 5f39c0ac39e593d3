"""The federation layer: what any engine shares, and one subpackage per engine.

Engine-neutral (no OpenFL, no Flower): ``names`` (names a client sends), ``manifest`` (an experiment as data),
``progress`` (metric names, the metric log, round lines, the best-model checkpointer), ``rounds`` (the round
tag), ``site_tasks`` (a site's shard and the three tasks it runs), ``site_model`` (the model a site builds from
a manifest, and the check of weights sent to it), ``local`` (the harness that starts and stops processes on
this machine). The engines' adapters: the subpackages ``openfl`` (OpenFL 1.7.1's director and envoys, the
seed's path and the default) and ``flower`` (a SuperLink and SuperNodes).

The notebook imports this package as ``fed`` and uses the names below; each loads its module on first use,
so the engine-neutral modules import without OpenFL.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    **dict.fromkeys(
        (
            "EXPERIMENT_RECORD",
            "DirectorFederation",
            "FederationError",
            "attach",
            "connect",
            "experiment_status",
            "fetch_last_model",
            "online_envoys",
            "shard_bundle_folders",
            "shard_defect_types",
            "shard_table",
            "start_experiment",
            "wait_for_envoys",
        ),
        "patchsvdd.federated.openfl.client",
    ),
    **dict.fromkeys(("DirectorGoneError", "Watchdog", "follow_metrics"), "patchsvdd.federated.openfl.monitor"),
    **dict.fromkeys(
        (
            "DEFECT_FUSION",
            "EXPORT_METRICS",
            "MetricLog",
            "RoundLines",
            "SaveWhenImproved",
            "final_metrics",
            "round_metrics",
            "train_metrics",
        ),
        "patchsvdd.federated.progress",
    ),
    "MVTecDataInterface": "patchsvdd.federated.openfl.tasks",
    **dict.fromkeys(
        ("SiteData", "SiteError", "export_task", "train_task", "validate_task"), "patchsvdd.federated.site_tasks"
    ),
    "OpenFLEngine": "patchsvdd.federated.openfl.engine",
    "HELDOUT_METRICS": "patchsvdd.settings",
    "ExperimentSettings": "patchsvdd.settings",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'patchsvdd.federated' has no attribute {name!r}")
