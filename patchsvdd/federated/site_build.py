"""What a site (and the director) runs for an experiment, built from its own code and a checked manifest.

OpenFL 1.7.1 would restore five objects from the client's pickles (``Plan.restore_object``): the model
interface, the tasks, the data interface (at an envoy), the task assigner and the aggregation functions (at
the director). Here each is made by this project's code from ``manifest.ExperimentManifest``, which is data:

- the model: the registered family's network of the manifest's architecture, round-tagged, with Adam at
  ``settings.lr`` (``training.loop.make_optimizer``). It is made on the meta device first, so that its size is
  known before a byte is allocated (``MAX_PARAMETERS``), then given zeroed memory: the aggregator sends the
  weights of every round before any task uses them (checked by ``check_weights``);
- the tasks: ``tasks.training_tasks``, ``evaluation_tasks`` or ``export_tasks`` of the manifest's settings;
- the data interface: a fresh ``MVTecDataInterface``; the assigner: ``TrainThenValidate``; aggregation: FedAvg.

``check_weights`` is the one check of weights a client or an aggregator sends: exactly the model's state-dict
keys, each a float32 array of that key's shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from openfl.interface.interactive_api.experiment import ModelInterface, TaskInterface
from torch import nn

from patchsvdd.federated.manifest import ExperimentManifest
from patchsvdd.federated.names import ExperimentRefused, shown
from patchsvdd.federated.review import FRAMEWORK_ADAPTER
from patchsvdd.federated.rounds import tagged
from patchsvdd.federated.tasks import (
    MVTecDataInterface,
    TrainThenValidate,
    evaluation_tasks,
    export_tasks,
    training_tasks,
)
from patchsvdd.models.registry import family
from patchsvdd.training.loop import make_optimizer

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


def site_tasks(manifest: ExperimentManifest) -> TaskInterface:
    """The manifest's tasks, as this project defines them."""
    if manifest.task == "training":
        return training_tasks(manifest.settings)
    if manifest.task == "evaluation":
        return evaluation_tasks(
            manifest.settings, None if manifest.defect_types is None else list(manifest.defect_types)
        )
    assert manifest.export is not None  # parse_manifest: an export experiment has its export
    return export_tasks(manifest.export.name, manifest.export.bank_fraction, manifest.export.max_fpr)


@dataclass
class SiteObjects:
    """The five objects OpenFL 1.7.1 would have unpickled, made by this project's code; ``by_file`` maps OpenFL's
    pickle names (``api_layer.settings``) to them. The model is made only where it is asked for (an envoy)."""

    manifest: ExperimentManifest
    tasks: TaskInterface
    assigner: TrainThenValidate
    _model_interface: ModelInterface | None = None

    @classmethod
    def build(cls, manifest: ExperimentManifest) -> SiteObjects:
        tasks = site_tasks(manifest)
        return cls(manifest, tasks, TrainThenValidate(tasks, manifest.training_rounds))

    @property
    def model_interface(self) -> ModelInterface:
        if self._model_interface is None:
            model = site_model(self.manifest)
            self._model_interface = ModelInterface(
                model=model,
                optimizer=make_optimizer(model, self.manifest.settings.lr),
                framework_plugin=FRAMEWORK_ADAPTER,
            )
        return self._model_interface

    def by_file(self, filename: str) -> Any:
        """The object OpenFL would restore from ``filename`` (one of its five pickle names)."""
        makers = {
            "model_obj.pkl": lambda: self.model_interface,
            "tasks_obj.pkl": lambda: self.tasks,
            "loader_obj.pkl": MVTecDataInterface,
            "task_assigner_obj.pkl": lambda: self.assigner,
            "aggregation_function_obj.pkl": lambda: self.tasks.aggregation_functions,
        }
        if filename not in makers:
            raise ExperimentRefused(f"OpenFL asked for {shown(filename)}, which this project never restores")
        return makers[filename]()
