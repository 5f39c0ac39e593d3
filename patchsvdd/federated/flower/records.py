"""What travels in a Flower message of this project, as Flower records, and how each side reads it back.

A task message (driver -> site) holds:

- ``task``: a ConfigRecord: ``manifest`` (``manifest.json``'s text), ``experiment`` (its name), ``round``;
- ``arrays``: an ArrayRecord of the round-tagged model's weights, float32 numpy arrays by state-dict key
  (Flower loads each with ``numpy.load(allow_pickle=False)``).

A reply (site -> driver) holds ``metrics`` (a MetricRecord per task that ran: ``train``,
``aggregated_model_validate``), ``sizes`` (the site's training and test image counts, FedAvg's weights) and,
after training, ``arrays``. A ``describe`` query's reply holds ``site``: a ConfigRecord of the site's name and
shard. Every read checks types and sizes, and raises ``RecordError`` naming what is wrong.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from patchsvdd.federated.manifest import MAX_MANIFEST_BYTES, ExperimentManifest, parse_manifest
from patchsvdd.federated.names import ExperimentRefused, check_name

TASK, ARRAYS, METRICS, SIZES, SITE = "task", "arrays", "metrics", "sizes", "site"
TRAIN = "train"
MAX_ROUND = 10_000


class RecordError(ValueError):
    """A message does not hold what this project sends; the message says what."""


def weights_record(weights: Mapping[str, Any]) -> ArrayRecord:
    """An ArrayRecord of a state dict's tensors (or arrays), each as a float32 numpy array."""
    arrays = {}
    for key, value in weights.items():
        array = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        arrays[key] = Array.from_numpy_ndarray(np.ascontiguousarray(array, dtype=np.float32))
    return ArrayRecord(arrays)


def record_weights(content: RecordDict) -> dict[str, np.ndarray]:
    """{key: array} of a message's ``arrays`` (checked against the model by ``site_model.check_weights``)."""
    if ARRAYS not in content.array_records:
        raise RecordError("the message holds no weights ('arrays')")
    try:
        return {key: array.numpy() for key, array in content.array_records[ARRAYS].items()}
    except (TypeError, ValueError) as exc:
        raise RecordError(f"the weights cannot be read as numpy arrays: {exc}") from exc


def task_record(manifest: ExperimentManifest, experiment: str, round_number: int) -> ConfigRecord:
    """The ``task`` record of round ``round_number`` of experiment ``experiment``."""
    return ConfigRecord(
        {"manifest": manifest.to_json().decode("ascii"), "experiment": experiment, "round": round_number}
    )


def read_task(content: RecordDict) -> tuple[ExperimentManifest, str, int]:
    """(manifest, experiment name, round) of a task message; ExperimentRefused (from ``parse_manifest`` and
    ``check_name``) or RecordError for anything else than what this project sends."""
    if TASK not in content.config_records:
        raise RecordError("the message holds no task record")
    task = content.config_records[TASK]
    if set(task) != {"manifest", "experiment", "round"}:
        raise RecordError(f"the task record has the keys {sorted(map(str, task))[:5]}, not manifest, experiment, round")
    text, name, number = task["manifest"], task["experiment"], task["round"]
    if not isinstance(text, str) or len(text) > MAX_MANIFEST_BYTES:
        raise RecordError(f"the manifest is not text of at most {MAX_MANIFEST_BYTES} characters")
    if not isinstance(name, str):
        raise RecordError("the experiment's name is not text")
    if not isinstance(number, int) or isinstance(number, bool) or not 0 <= number <= MAX_ROUND:
        raise RecordError(f"the round is {number!r:.20}, not a whole number from 0 to {MAX_ROUND}")
    check_name(name, "the experiment's name")
    try:
        manifest = parse_manifest(text.encode("ascii"))
    except UnicodeEncodeError as exc:
        raise ExperimentRefused("its manifest is not ASCII JSON") from exc
    return manifest, name, number


def metrics_record(values: Mapping[str, float]) -> MetricRecord:
    """A MetricRecord of task results (NaN where a metric is undefined, as the tasks report it)."""
    return MetricRecord({key: float(value) for key, value in values.items()})


def read_metrics(content: RecordDict, name: str) -> dict[str, float]:
    """The metrics ``name`` of a reply ({} where the reply has none)."""
    record = content.metric_records.get(name)
    if record is None:
        return {}
    out = {}
    for key, value in record.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise RecordError(f"the metric {key!r:.40} is not a number")
        out[str(key)] = float(value)
    return out


def read_sizes(content: RecordDict) -> tuple[int, int]:
    """(training images, test images) of a reply: FedAvg's and the metrics' weights."""
    sizes = read_metrics(content, SIZES)
    train, test = sizes.get("train_size", math.nan), sizes.get("test_size", math.nan)
    if not all(math.isfinite(v) and v >= 0 and v == int(v) for v in (train, test)):
        raise RecordError(f"the reply's sizes {sizes} are not two counts")
    return int(train), int(test)
