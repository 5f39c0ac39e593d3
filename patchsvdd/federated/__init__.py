"""The federation layer: the only part of ``patchsvdd`` that imports OpenFL (1.7.1, director/envoy API).

- ``tasks``: what travels to the envoys (data interface, train/validate/export tasks, task assigner);
- ``client``: the notebook's side of the director (connect, shard registry, submit, attach, fetch);
- ``monitor``: following an experiment (metric log, watchdog, stream reader, best-model checkpointer).

The notebook imports this package as ``fed`` and uses the names below.
"""

from patchsvdd.federated.client import (
    EXPERIMENT_RECORD,
    DirectorFederation,
    FederationError,
    attach,
    connect,
    experiment_status,
    fetch_last_model,
    online_envoys,
    shard_bundle_folders,
    shard_defect_types,
    shard_table,
    start_evaluation,
    start_experiment,
    start_export,
    wait_for_envoys,
)
from patchsvdd.federated.monitor import (
    DirectorGoneError,
    MetricLog,
    RoundLines,
    SaveWhenImproved,
    Watchdog,
    follow_metrics,
)
from patchsvdd.federated.tasks import (
    DEFECT_FUSION,
    EXPORT_METRICS,
    FINAL_METRICS,
    HELDOUT_METRIC,
    ROUND_METRICS,
    TRAIN_METRICS,
    MVTecDataInterface,
    SiteData,
    SiteError,
    export_task,
    final_metrics,
    round_metrics,
    train_task,
    validate_task,
)
from patchsvdd.settings import HELDOUT_METRICS, ExperimentSettings

__all__ = [
    "DEFECT_FUSION",
    "EXPERIMENT_RECORD",
    "EXPORT_METRICS",
    "FINAL_METRICS",
    "HELDOUT_METRIC",
    "ROUND_METRICS",
    "HELDOUT_METRICS",
    "TRAIN_METRICS",
    "final_metrics",
    "round_metrics",
    "DirectorFederation",
    "DirectorGoneError",
    "ExperimentSettings",
    "FederationError",
    "MVTecDataInterface",
    "MetricLog",
    "RoundLines",
    "SaveWhenImproved",
    "SiteData",
    "SiteError",
    "Watchdog",
    "attach",
    "connect",
    "experiment_status",
    "export_task",
    "fetch_last_model",
    "follow_metrics",
    "online_envoys",
    "shard_bundle_folders",
    "shard_defect_types",
    "shard_table",
    "start_evaluation",
    "start_experiment",
    "start_export",
    "train_task",
    "validate_task",
    "wait_for_envoys",
]
