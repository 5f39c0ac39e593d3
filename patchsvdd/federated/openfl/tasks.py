"""OpenFL's wrapping of what a site runs (``site_tasks.py``): its task keeper and data interface, the three
task sets and the task assigner, made at each site from the experiment's manifest by ``site_build.py``;
nothing here travels.
"""

from __future__ import annotations

from typing import Any

from openfl.interface.interactive_api.experiment import DataInterface, TaskInterface

from patchsvdd.federated.site_tasks import (  # noqa: F401  (the site's tasks, as OpenFL registers them)
    SITE_HEADS,
    SiteData,
    SiteError,
    export_task,
    final_validation,
    heldout_metric,
    keep_site_heads,
    proximal_term,
    restore_site_heads,
    round_validation,
    site_data,
    train_task,
    validate_task,
)
from patchsvdd.settings import ExperimentSettings


class ProjectTasks(TaskInterface):
    """OpenFL's task keeper, except that each registered task is this project's function itself (OpenFL's
    ``register_fl_task`` stores a wrapper it defines inside the method). OpenFL calls the stored task as the
    wrapper did: with the task's arguments as keywords. A site makes it from the manifest (``site_build.py``)."""

    def register_fl_task(self, model, data_loader, device, optimizer=None, round_num=None):
        register = super().register_fl_task(model, data_loader, device, optimizer, round_num)

        def decorator(function):
            register(function)
            self.task_registry[function.__name__] = function
            return function

        return decorator


class MVTecDataInterface(DataInterface):
    """Gives the tasks the envoy's shard as a ``SiteData`` (uint8 arrays, decoded once)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._data: SiteData | None = None

    @property
    def shard_descriptor(self):
        return self._shard_descriptor

    @shard_descriptor.setter
    def shard_descriptor(self, shard_descriptor) -> None:
        self._shard_descriptor = shard_descriptor
        self._data = site_data(shard_descriptor)

    @property
    def data(self) -> SiteData:
        """The shard, once OpenFL has given this interface the envoy's shard descriptor."""
        if self._data is None:
            raise SiteError("the data interface has no shard yet (OpenFL sets its shard_descriptor first)")
        return self._data

    def get_train_loader(self, **kwargs: Any) -> SiteData:
        return self.data

    def get_valid_loader(self, **kwargs: Any) -> SiteData:
        return self.data

    def get_train_data_size(self) -> int:
        return len(self.data.train_images)

    def get_valid_data_size(self) -> int:
        return len(self.data.test_images)


def _with_validation(tasks: TaskInterface, **kwargs: Any) -> TaskInterface:
    tasks.add_kwargs(**kwargs)(validate_task)
    tasks.register_fl_task(model="model", data_loader="val_data", device="device")(validate_task)
    return tasks


def training_tasks(settings: ExperimentSettings, metric_names: tuple[str, ...] | None = None) -> TaskInterface:
    """``train_task`` (with the optimizer) and ``validate_task`` (``site_tasks.round_validation``)."""
    tasks = ProjectTasks()
    tasks.add_kwargs(settings=settings)(train_task)
    tasks.register_fl_task(
        model="model", data_loader="train_data", device="device", optimizer="optimizer", round_num="round_num"
    )(train_task)
    return _with_validation(tasks, **round_validation(settings, metric_names))


def evaluation_tasks(settings: ExperimentSettings, defect_types: list[str] | None = None) -> TaskInterface:
    """Only ``validate_task`` (``site_tasks.final_validation``)."""
    return _with_validation(ProjectTasks(), **final_validation(settings, defect_types))


def export_tasks(name: str, bank_fraction: float, max_fpr: float | None) -> TaskInterface:
    """Only ``export_task``: every envoy writes bundle ``name`` at its site."""
    tasks = ProjectTasks()
    tasks.add_kwargs(name=name, bank_fraction=bank_fraction, max_fpr=max_fpr)(export_task)
    tasks.register_fl_task(model="model", data_loader="val_data", device="device")(export_task)
    return tasks


class TrainThenValidate:
    """Task assigner: ``training_rounds`` rounds of train + validate, then one validation-only round (with
    ``training_rounds`` 0, as evaluation and export have it: only that round, of the one registered task).

    OpenFL 1.7.1 validates the model a round *starts* with and keeps that one
    as "last", so the aggregate of the final training round would be neither
    validated nor returned; the extra round fixes both. The locally-tuned
    validation of OpenFL's default assigner is left out: it doubles the cost
    of validation for a number nobody aggregates.
    """

    def __init__(self, tasks: TaskInterface, training_rounds: int) -> None:
        registered = tasks.get_registered_tasks()
        if training_rounds and "train" not in registered:
            raise ValueError(f"{training_rounds} training rounds but no training task registered")
        self.train = registered.get("train")
        self.validate = registered["aggregated_model_validate"]
        self.training_rounds = training_rounds

    def __call__(self, collaborators, round_number, **kwargs) -> dict:
        return {name: list(self.tasks_of_round(round_number)) for name in collaborators}

    def tasks_of_round(self, round_number: int) -> list:
        """The tasks every envoy runs in ``round_number`` (0-based)."""
        return [self.train, self.validate] if round_number < self.training_rounds else [self.validate]
