"""What a site (and the director) runs for an experiment, built from its own code and a checked manifest.

OpenFL 1.7.1 would restore five objects from the client's pickles (``Plan.restore_object``): the model
interface, the tasks, the data interface (at an envoy), the task assigner and the aggregation functions (at
the director). Here each is made by this project's code from ``manifest.ExperimentManifest``, which is data:

- the model: ``site_model.site_model`` of the manifest (the registered family's network of its architecture,
  round-tagged, weights zero until the aggregator's arrive), with Adam at ``settings.lr``;
- the tasks: ``tasks.training_tasks``, ``evaluation_tasks`` or ``export_tasks`` of the manifest's settings;
- the data interface: a fresh ``MVTecDataInterface``; the assigner: ``TrainThenValidate``; aggregation: FedAvg.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from openfl.interface.interactive_api.experiment import ModelInterface, TaskInterface

from patchsvdd.federated.manifest import ExperimentManifest
from patchsvdd.federated.names import ExperimentRefused, shown
from patchsvdd.federated.openfl.review import FRAMEWORK_ADAPTER
from patchsvdd.federated.openfl.tasks import (
    MVTecDataInterface,
    TrainThenValidate,
    evaluation_tasks,
    export_tasks,
    training_tasks,
)
from patchsvdd.federated.site_model import site_model
from patchsvdd.training.loop import make_optimizer


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
