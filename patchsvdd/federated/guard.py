"""The site guard: an envoy runs only this project's code, whatever a client of the director sends.

OpenFL 1.7.1's envoy unpacks the archive a client sent, parses its ``plan/plan.yaml``, builds whatever
class each ``template`` names (``Plan.build``) and ``cloudpickle.load``s the model, tasks and data
interface (``Plan.restore_object``). An object defined in a notebook or script travels *by value*, code
and all; so without a guard any holder of a client certificate runs code of its choice at every site,
with the site's images at hand.

``review_archive`` decides, before OpenFL unpacks anything, whether an experiment may run here:

1. **files**: only what this project's client sends (the plan, the five pickles, an empty
   ``requirements.txt``, its experiment record, ``save/*.pbuf``); no Python file or any other file;
2. **plan**: exactly the OpenFL components this project's experiments use (``TEMPLATES``), no
   ``defaults`` file, its updates sent to this envoy's own director, with this envoy's TLS setting;
3. **pickles**: each one loaded with ``RestrictedUnpickler``, which resolves only the allow-listed
   globals (this project's model, task, data-interface, assigner and settings classes by name, the
   torch and numpy builders of tensors and arrays, a few containers, OpenFL's interface classes) and
   refuses cloudpickle's rebuilding of code sent by value, and any call or state it does not expect;
4. **objects**: the model is a known model whose state-dict keys and shapes are those of its
   architecture, without hooks; the tasks are this project's functions, their settings validated
   (``settings.checked_settings``, ``check_task_settings``); the data interface is this project's;
5. **requirements**: an experiment that asks to install packages is refused unless the site's config
   says ``params.install_requirements: true``.

``install_site_guard`` patches, in the envoy process only (``python -m patchsvdd.federated.fx envoy
start``, what ``start_envoy.sh`` runs):

- ``openfl.component.envoy.envoy.Envoy`` → ``GuardedEnvoy`` (before OpenFL's CLI imports it): OpenFL's experiment
  loop (``Envoy.run``) with
  the review first; a refused experiment is reported to the director as failed, with the reason, and
  one line ``[site guard] <site> refused experiment '<name>': <why>`` in the envoy's log; the envoy
  then waits for the next experiment. Its workspace is not put on ``sys.path`` (OpenFL's is), so no
  file from an archive is ever importable;
- ``CloudpickleSerializer.restore_object`` → ``restricted_restore``: every pickle OpenFL restores in
  the envoy goes through the same unpickler (the review saw the same files; this keeps it so);
- ``FrameworkAdapterPlugin.set_tensor_dict``: the weights the aggregator sends each round must be
  arrays of the model's own state-dict keys and shapes (``check_weights``).

``trust_client_code: true`` at the top of a shard config turns all of this off for development (OpenFL's
behaviour); the envoy then says so at start and in every experiment. The shipped configs never set it.
"""

from __future__ import annotations

import importlib
import io
import logging
import pickle
import re
import sys
import time
import traceback
import zipfile
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from patchsvdd.federated.rounds import ROUND_TAG
from patchsvdd.federated.tasks import (
    DEFECT_FUSION,
    MVTecDataInterface,
    ProjectTasks,
    TrainThenValidate,
    export_task,
    final_metrics,
    round_metrics,
    train_task,
    validate_task,
)
from patchsvdd.models.registry import family, family_of, model_names
from patchsvdd.settings import DEVICE_POLICIES, SEARCHES, SettingsError, checked_settings

logger = logging.getLogger(__name__)

FRAMEWORK_ADAPTER = "openfl.plugins.frameworks_adapters.pytorch_adapter.FrameworkAdapterPlugin"
SERIALIZER = "openfl.plugins.interface_serializer.cloudpickle_serializer.CloudpickleSerializer"
# (plan path) -> the one component this project's experiments (training, evaluation, export) build there.
TEMPLATES = {
    ("aggregator", "template"): "openfl.component.Aggregator",
    ("assigner", "template"): "openfl.component.RandomGroupedAssigner",
    ("collaborator", "template"): "openfl.component.Collaborator",
    ("compression_pipeline", "template"): "openfl.pipelines.NoCompressionPipeline",
    ("data_loader", "template"): "openfl.federated.DataLoader",
    ("network", "template"): "openfl.federation.Network",
    ("task_runner", "template"): "openfl.federated.task.task_runner.CoreTaskRunner",
    ("task_runner", "required_plugin_components", "framework_adapters"): FRAMEWORK_ADAPTER,
    ("api_layer", "required_plugin_components", "serializer_plugin"): SERIALIZER,
}
PLAN_SECTIONS = frozenset(path[0] for path in TEMPLATES) | {"tasks"}
# api_layer.settings: the role of each pickle, as the refusals name it.
PICKLES = {
    "model_interface_file": ("model_obj.pkl", "its model"),
    "tasks_interface_file": ("tasks_obj.pkl", "its tasks"),
    "dataloader_interface_file": ("loader_obj.pkl", "its data interface"),
    "task_assigner_file": ("task_assigner_obj.pkl", "its task assigner"),
    "aggregation_function_interface_file": ("aggregation_function_obj.pkl", "its aggregation functions"),
}
PLAN_FILE = "plan/plan.yaml"
REQUIREMENTS_FILE = "requirements.txt"
EXPERIMENT_RECORD = "patchsvdd_experiment.json"  # client.EXPERIMENT_RECORD
ARCHIVE_FILES = frozenset({PLAN_FILE, REQUIREMENTS_FILE, EXPERIMENT_RECORD, *(name for name, _ in PICKLES.values())})
MAX_ARCHIVE_BYTES = 2**30  # uncompressed; this project's archives hold a model of a few MB
REFUSED_BACKOFF_SECONDS = 5  # an envoy that is handed an experiment it refused waits this long before asking again
NETWORK_SETTINGS = frozenset(
    {"agg_addr", "agg_port", "cert_folder", "client_reconnect_interval", "hash_salt", "require_client_auth", "use_tls"}
)
COLLABORATOR_SETTINGS = {
    "db_store_rounds": int,
    "delta_updates": bool,
    "device_assignment_policy": str,
    "opt_treatment": str,
}
OPT_TREATMENTS = ("RESET", "CONTINUE_LOCAL", "CONTINUE_GLOBAL")
SITE_TASKS = {function.__name__: function for function in (train_task, validate_task, export_task)}
BUNDLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
BY_VALUE = "is code sent by the client (by value), not one of this project's classes"
TRUST_WARNING = (
    "trust_client_code is on: this envoy runs whatever code a client of the director sends, with this "
    "site's data at hand (for development only; remove it from the shard config)"
)


class ExperimentRefused(Exception):
    """An experiment this site does not run; ``str()`` says what was refused and why (no site or name)."""


# --- pickles ------------------------------------------------------------------------------------------------------


def _storage_from_bytes(data: bytes) -> Any:
    """``torch.storage._load_from_bytes`` without its unrestricted ``torch.load``: a tensor's storage, read
    by torch's own weights-only unpickler."""
    storage = torch.load(io.BytesIO(data), weights_only=True)
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise ExperimentRefused(f"a tensor's storage holds a {type(storage).__name__}")
    return storage


def _no_hooks(hooks: Any, where: str) -> None:
    if hooks:  # None or an empty OrderedDict in every tensor this project sends
        raise ExperimentRefused(f"{where} carries hooks, which this project's models never have")


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    _no_hooks(backward_hooks, "a tensor")
    return torch._utils._rebuild_tensor_v2(
        storage, storage_offset, size, stride, requires_grad, OrderedDict(), metadata
    )


def _rebuild_parameter(data, requires_grad, backward_hooks):
    _no_hooks(backward_hooks, "a parameter")
    return torch._utils._rebuild_parameter(data, requires_grad, OrderedDict())


# Globals a pickle may call while it loads (REDUCE), mapped to what is called instead where that differs.
CALLS: dict[tuple[str, str], Callable[..., Any] | None] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("torch", "device"): None,
    ("torch", "Size"): None,
    ("collections", "OrderedDict"): None,
    ("collections", "defaultdict"): None,
    **{("builtins", name): None for name in ("dict", "list", "set", "frozenset", "tuple", "bytearray", "complex")},
    ("numpy.core.multiarray", "_reconstruct"): None,
    ("numpy._core.multiarray", "_reconstruct"): None,
    ("numpy.core.multiarray", "scalar"): None,
    ("numpy._core.multiarray", "scalar"): None,
    ("numpy", "dtype"): None,
    ("numpy", "ndarray"): None,
}


def _network_classes() -> dict[str, tuple[str, ...]]:
    """The classes every registered model's networks are made of, by module (``ModelFamily.network_classes``)."""
    out: dict[str, tuple[str, ...]] = {}
    for name in model_names():
        for cls in family(name).network_classes:
            out[cls.__module__] = (*out.get(cls.__module__, ()), cls.__name__)
    return out


# Classes a pickle may make (NEWOBJ) and fill (BUILD), by module: the models' networks, this project's and
# OpenFL's interface classes.
CLASSES = {
    **_network_classes(),
    "patchsvdd.federated.tasks": ("MVTecDataInterface", "ProjectTasks", "TrainThenValidate"),
    "patchsvdd.settings": ("ExperimentSettings",),
    "openfl.interface.interactive_api.experiment": ("ModelInterface",),
    "openfl.component.assigner.tasks": ("TrainTask", "ValidateTask"),
    "openfl.interface.aggregation_functions.weighted_average": ("WeightedAverage",),
    "numpy": ("ndarray", "dtype"),
}
# Globals a pickle may only refer to (never call): the tasks, which OpenFL calls with the site's own objects.
REFERENCES = {("patchsvdd.federated.tasks", name) for name in SITE_TASKS}


def _torch_class(module: str, value: Any) -> bool:
    """A layer (``torch.nn.modules.*``) or an optimizer (``torch.optim.*``) class of torch itself."""
    if not isinstance(value, type) or value.__module__ != module:
        return False
    return (module.startswith("torch.nn.modules.") and issubclass(value, nn.Module)) or (
        module.startswith("torch.optim.") and issubclass(value, torch.optim.Optimizer)
    )


class RestrictedUnpickler(pickle._Unpickler):  # the Python implementation: its opcodes can be overridden
    """``pickle.Unpickler`` that resolves only allow-listed globals (``CALLS``, ``CLASSES``, ``REFERENCES``, torch's
    layer and optimizer classes and dtypes), calls only ``CALLS``, makes and fills only instances of allowed
    classes, and raises ``ExperimentRefused`` naming ``role`` for anything else: cloudpickle's rebuilding of
    functions, classes and code sent by value, ``builtins.eval``/``exec``/``getattr``, ``os``, ``subprocess``...
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: io.BufferedIOBase, role: str = "an object") -> None:
        super().__init__(file)
        self.role = role
        self._callables: set[int] = set()
        self._classes: set[type] = set()

    def find_class(self, module: str, name: str) -> Any:
        if module.split(".")[0] == "cloudpickle":
            raise ExperimentRefused(f"{self.role} {BY_VALUE} ({module}.{name})")
        if "." in name:
            raise ExperimentRefused(f"{self.role} reaches into {module}.{name}, which no pickle of this project does")
        key = (module, name)
        value = None
        if key in CALLS or name in CLASSES.get(module, ()) or key in REFERENCES or module.split(".")[0] == "torch":
            value = getattr(importlib.import_module(module), name, None)
        if key in CALLS:
            value = CALLS[key] or value
            self._callables.add(id(value))
            if isinstance(value, type):
                self._classes.add(value)
            return value
        if isinstance(value, type) and (name in CLASSES.get(module, ()) or _torch_class(module, value)):
            self._classes.add(value)
            return value
        if key in REFERENCES or (module == "torch" and isinstance(value, torch.dtype)):
            return value
        raise ExperimentRefused(
            f"{self.role} needs {module}.{name}, which is neither one of this project's classes "
            "nor a builder of tensors, arrays or containers"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise ExperimentRefused(
            f"{self.role} refers to objects outside the pickle, which no pickle of this project does"
        )

    def _check_class(self, cls: Any, what: str) -> None:
        if not isinstance(cls, type) or cls not in self._classes:
            raise ExperimentRefused(
                f"{self.role} {what} {getattr(cls, '__qualname__', type(cls).__name__)}, which "
                "is not one of the classes this project sends"
            )

    def load_reduce(self) -> None:
        args = self.stack.pop()
        call = self.stack[-1]
        if id(call) not in self._callables:
            raise ExperimentRefused(
                f"{self.role} calls {getattr(call, '__qualname__', repr(call))} while it is "
                "loaded, which no pickle of this project does"
            )
        self.stack[-1] = call(*args)

    dispatch[pickle.REDUCE[0]] = load_reduce

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self._check_class(cls, "makes a")
        self.append(cls.__new__(cls, *args))

    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self._check_class(cls, "makes a")
        self.append(cls.__new__(cls, *args, **kwargs))

    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    def load_build(self) -> None:
        instance = self.stack[-2]
        if isinstance(instance, type) or not (type(instance) in self._classes or isinstance(instance, torch.Tensor)):
            raise ExperimentRefused(
                f"{self.role} sets the state of a {type(instance).__name__}, which no pickle of this project does"
            )
        pickle._Unpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = load_build

    def _refuse_old_opcodes(self) -> None:  # INST and OBJ call a class's __init__ (pickle protocols 0 and 1)
        raise ExperimentRefused(f"{self.role} uses pickle opcodes that call a class while loading (protocol 0/1)")

    dispatch[pickle.INST[0]] = _refuse_old_opcodes
    dispatch[pickle.OBJ[0]] = _refuse_old_opcodes


def restricted_loads(data: bytes, role: str = "an object") -> Any:
    """The object pickled in ``data``, loaded with ``RestrictedUnpickler``; ExperimentRefused names ``role``."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), role).load()
    except ExperimentRefused:
        raise
    except Exception as exc:  # a malformed pickle, or an allowed builder given arguments it rejects
        raise ExperimentRefused(f"{role} cannot be loaded safely ({type(exc).__name__}: {exc})") from exc


def restricted_restore(filename: str) -> Any:
    """``CloudpickleSerializer.restore_object`` through ``RestrictedUnpickler`` (installed by the site guard)."""
    with open(filename, "rb") as file:
        data = file.read()
    role = next((role for name, role in PICKLES.values() if PurePosixPath(filename).name == name), str(filename))
    return restricted_loads(data, role)


# --- the objects in the pickles -------------------------------------------------------------------------------------


def _check_hooks(owner: Any, where: str) -> None:
    for attribute, value in vars(owner).items():
        if "hook" in attribute and isinstance(value, dict):
            _no_hooks(value, where)


def check_model(model: Any) -> str:
    """The kind of ``model`` if it is one of this project's models as its architecture builds it: the same
    state-dict keys and shapes (and the round tag, shape (1,)), no hooks; else ExperimentRefused."""
    try:
        model_family = family_of(model)
        numbers = model_family.architecture(model)
    except (TypeError, AttributeError, ValueError) as exc:
        raise ExperimentRefused(f"its model is not one of this project's models ({exc})") from exc
    kind = model_family.name
    for key, value in numbers.items():
        if key not in model_family.architecture_limits:
            raise ExperimentRefused(f"its model's architecture names {key!r}, which a {kind} has not")
        low, high = model_family.architecture_limits[key]
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ExperimentRefused(f"its model's {key} is {value!r}; this project's models have {low}..{high}")
    expected = {key: tuple(value.shape) for key, value in model_family.from_architecture(numbers).state_dict().items()}
    expected[ROUND_TAG] = (1,)
    try:
        state = model.state_dict()
    except Exception as exc:
        raise ExperimentRefused(f"its model has no readable weights ({type(exc).__name__})") from exc
    for key, value in state.items():
        if key not in expected or not isinstance(value, torch.Tensor) or tuple(value.shape) != expected[key]:
            raise ExperimentRefused(
                f"its model's weight {key!r} ({tuple(getattr(value, 'shape', ()))}) is not one "
                f"of a {kind} of this architecture"
            )
    missing = set(expected) - set(state) - {ROUND_TAG}
    if missing:
        raise ExperimentRefused(f"its model lacks the weights {sorted(missing)[:3]} of a {kind}")
    for module in model.modules():
        _check_hooks(module, "its model")
    for parameter in model.parameters():
        _no_hooks(parameter._backward_hooks, "a weight of its model")
    return kind


def check_model_interface(interface: Any) -> str:
    """The model's kind if ``interface`` is OpenFL's ModelInterface of a project model, its Adam optimizer (or
    none) and the PyTorch adapter; else ExperimentRefused."""
    from openfl.interface.interactive_api.experiment import ModelInterface

    if type(interface) is not ModelInterface:
        raise ExperimentRefused(f"its model interface is a {type(interface).__name__}, not OpenFL's ModelInterface")
    if getattr(interface, "framework_plugin", None) != FRAMEWORK_ADAPTER:
        raise ExperimentRefused(f"its model interface names the framework plugin {interface.framework_plugin!r}")
    kind = check_model(interface.model)
    optimizer = interface.optimizer
    if optimizer is not None:
        if type(optimizer) is not torch.optim.Adam:
            raise ExperimentRefused(f"its optimizer is a {type(optimizer).__name__}; this project's is Adam")
        _check_hooks(optimizer, "its optimizer")
        own = {id(p) for p in interface.model.parameters()}
        if any(id(p) not in own for group in optimizer.param_groups for p in group["params"]):
            raise ExperimentRefused("its optimizer holds tensors that are not its model's weights")
    return kind


def _number(value: Any, low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    return above and below


def _names(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) and 0 < len(v) <= 200 for v in value)


METRIC_NAMES = frozenset(name for model in model_names() for name in (*round_metrics(model), *final_metrics(model)))


def check_task_settings(function: str, kwargs: Any) -> None:
    """ExperimentRefused unless ``kwargs`` are settings this project's task ``function`` takes, each valid."""
    if not isinstance(kwargs, dict):
        raise ExperimentRefused(f"the settings of its task {function} are a {type(kwargs).__name__}")
    allowed: dict[str, Callable[[Any], bool]]
    if function == "train_task":
        allowed = {"settings": lambda v: checked_settings(v) is not None}
    elif function == "validate_task":
        allowed = {
            "search": lambda v: v in SEARCHES,
            "metric_names": lambda v: _names(v) and set(v) <= METRIC_NAMES,
            "holdout_fraction": lambda v: _number(v, 0, 1, high_open=True),
            "defect_fusion": lambda v: v is None or v == DEFECT_FUSION,
            "defect_types": lambda v: v is None or _names(v),
        }
    else:
        allowed = {
            "name": lambda v: isinstance(v, str) and BUNDLE_NAME.fullmatch(v) is not None and ".." not in v,
            "bank_fraction": lambda v: _number(v, 0, 1, low_open=True),
            "max_fpr": lambda v: v is None or _number(v, 0, 1, low_open=True, high_open=True),
        }
    for key, value in kwargs.items():
        try:
            valid = key in allowed and allowed[key](value)
        except SettingsError as exc:
            raise ExperimentRefused(f"its task {function} gets invalid settings: {exc}") from exc
        if not valid:
            raise ExperimentRefused(f"its task {function} gets {key}={value!r}, which it does not take")


def check_tasks(tasks: Any) -> None:
    """ExperimentRefused unless ``tasks`` is this project's task set: its functions, contracts and settings."""
    from openfl.component.assigner.tasks import TrainTask, ValidateTask

    if type(tasks) is not ProjectTasks:
        raise ExperimentRefused(f"its tasks are a {type(tasks).__name__}, not this project's ProjectTasks")
    for name, function in tasks.task_registry.items():
        if SITE_TASKS.get(name) is not function:
            raise ExperimentRefused(f"its task {name!r} is not one of this project's tasks ({', '.join(SITE_TASKS)})")
    if not isinstance(tasks.task_settings, defaultdict) or tasks.task_settings.default_factory is not dict:
        raise ExperimentRefused("its task settings are not a plain mapping")
    for name, kwargs in tasks.task_settings.items():
        if name not in SITE_TASKS:
            raise ExperimentRefused(f"it has settings for {name!r}, which is not one of this project's tasks")
        check_task_settings(name, kwargs)
    for name, contract in tasks.task_contract.items():
        if not isinstance(contract, dict) or not all(v is None or isinstance(v, str) for v in contract.values()):
            raise ExperimentRefused(f"the contract of its task {name!r} is not a mapping of argument names")
    for task in tasks.get_registered_tasks().values():
        if type(task) not in (TrainTask, ValidateTask) or task.function_name not in tasks.task_registry:
            raise ExperimentRefused(f"it schedules {task!r}, which is not one of its registered tasks")
    check_aggregation(tasks.aggregation_functions)


def check_aggregation(functions: Any) -> None:
    """ExperimentRefused unless ``functions`` is OpenFL's default mapping to FedAvg (WeightedAverage)."""
    from openfl.interface.aggregation_functions import WeightedAverage

    if (
        not isinstance(functions, defaultdict)
        or functions.default_factory is not WeightedAverage
        or not all(type(f) is WeightedAverage for f in functions.values())
    ):
        raise ExperimentRefused("its aggregation is not this project's FedAvg (OpenFL's WeightedAverage)")


def check_loader(loader: Any) -> None:
    """ExperimentRefused unless ``loader`` is a fresh ``MVTecDataInterface`` (no settings, no data)."""
    if type(loader) is not MVTecDataInterface or vars(loader) != {"kwargs": {}, "_data": None}:
        raise ExperimentRefused(
            f"its data interface is a {type(loader).__name__} with state "
            f"{sorted(vars(loader)) if hasattr(loader, '__dict__') else '?'}, not a fresh "
            "MVTecDataInterface"
        )


def check_assigner(assigner: Any) -> None:
    """ExperimentRefused unless ``assigner`` is this project's ``TrainThenValidate``."""
    from openfl.component.assigner.tasks import TrainTask, ValidateTask

    if type(assigner) is not TrainThenValidate or set(vars(assigner)) != {"train", "validate", "training_rounds"}:
        raise ExperimentRefused(
            f"its task assigner is a {type(assigner).__name__}, not this project's TrainThenValidate"
        )
    if (
        not (assigner.train is None or type(assigner.train) is TrainTask)
        or type(assigner.validate) is not ValidateTask
        or not _number(assigner.training_rounds, 0, 100_000)
        or not isinstance(assigner.training_rounds, int)
    ):
        raise ExperimentRefused("its task assigner's tasks or rounds are not this project's")


OBJECT_CHECKS: dict[str, Callable[[Any], Any]] = {
    "model_interface_file": check_model_interface,
    "tasks_interface_file": check_tasks,
    "dataloader_interface_file": check_loader,
    "task_assigner_file": check_assigner,
    "aggregation_function_interface_file": check_aggregation,
}


def check_weights(model: nn.Module, tensor_dict: dict[str, Any]) -> None:
    """ExperimentRefused unless ``tensor_dict`` (from the aggregator) holds, for every key of ``model``'s state
    dict, a numeric array of that key's shape."""
    for key, value in model.state_dict().items():
        array = tensor_dict.get(key)
        if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiub" or array.shape != tuple(value.shape):
            got = f"{type(array).__name__} {getattr(array, 'shape', '')}".strip()
            raise ExperimentRefused(
                f"the aggregator's weights for {key!r} are {got}, not an array of shape {tuple(value.shape)}"
            )


# --- the plan, the files, the requirements --------------------------------------------------------------------------


@dataclass(frozen=True)
class SitePolicy:
    """What a node accepts. An envoy: its director's host (where its updates may go), whether it speaks TLS,
    whether its config lets experiments install packages, whether it trusts client code (the opt-out). The
    director (``director_host``/``tls`` None: not checked) reviews the same at submission."""

    director_host: str | None
    tls: bool | None
    install_requirements: bool = False
    trust_client_code: bool = False


def _templates(node: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """Every (path, value) under a 'template' key or in 'required_plugin_components' of the plan."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "template" or (len(path) and path[-1] == "required_plugin_components"):
                found.append(((*path, key), value))
            else:
                found.extend(_templates(value, (*path, str(key))))
    return found


def check_plan(plan: Any, policy: SitePolicy) -> None:
    """ExperimentRefused unless ``plan`` (plan.yaml, parsed) builds only ``TEMPLATES``, loads no defaults file,
    sends this site's updates to its own director with its TLS setting, and names the usual pickles."""
    if not isinstance(plan, dict) or not set(plan) <= PLAN_SECTIONS:
        extra = sorted(set(plan) - PLAN_SECTIONS) if isinstance(plan, dict) else type(plan).__name__
        raise ExperimentRefused(f"its plan has sections {extra}, which this project's experiments never have")
    for section, body in plan.items():
        if not isinstance(body, dict):
            raise ExperimentRefused(f"its plan's section {section!r} is not a mapping")
        if "defaults" in body:
            raise ExperimentRefused(f"its plan's section {section!r} loads a defaults file")
    for path, value in _templates(plan):
        expected = TEMPLATES.get(path)
        if value != expected:
            raise ExperimentRefused(
                f"its plan builds {value!r} for {'.'.join(path)}, not one of the OpenFL components "
                "this project's experiments use"
            )
    missing = [
        ".".join(path)
        for path in TEMPLATES
        if path[0] in ("collaborator", "task_runner", "api_layer", "network") and path not in dict(_templates(plan))
    ]
    if missing:
        raise ExperimentRefused(f"its plan lacks {', '.join(missing)}")

    def settings(section: str) -> dict[str, Any]:
        value = plan.get(section, {}).get("settings") or {}
        if not isinstance(value, dict):
            raise ExperimentRefused(f"its plan's {section}.settings is not a mapping")
        return value

    network = settings("network")
    if not set(network) <= NETWORK_SETTINGS:
        raise ExperimentRefused(f"its plan sets network.{sorted(set(network) - NETWORK_SETTINGS)[0]}")
    if policy.director_host is not None and str(network.get("agg_addr", "")).lower() != policy.director_host.lower():
        raise ExperimentRefused(
            f"its plan sends this site's updates to {network.get('agg_addr')!r}, not to this "
            f"envoy's director {policy.director_host!r}"
        )
    if not isinstance(network.get("use_tls"), bool):
        raise ExperimentRefused(f"its plan sets use_tls {network.get('use_tls')!r}")
    if policy.tls is not None and network.get("use_tls") is not policy.tls:
        raise ExperimentRefused(
            f"its plan sets use_tls {network.get('use_tls')!r} but this envoy "
            f"{'speaks' if policy.tls else 'does not speak'} TLS"
        )
    if not _number(network.get("agg_port"), 1, 65535) or network.get("cert_folder", "cert") != "cert":
        raise ExperimentRefused("its plan's network port or certificate folder is not a plain one")
    collaborator = settings("collaborator")
    for key, value in collaborator.items():
        if key not in COLLABORATOR_SETTINGS or type(value) is not COLLABORATOR_SETTINGS[key]:
            raise ExperimentRefused(f"its plan sets collaborator.{key}={value!r}")
    if (
        collaborator.get("device_assignment_policy", "CPU_ONLY") not in DEVICE_POLICIES
        or collaborator.get("opt_treatment", "RESET") not in OPT_TREATMENTS
    ):
        raise ExperimentRefused("its plan's device policy or optimizer treatment is not one OpenFL knows")
    for section in ("data_loader", "task_runner", "compression_pipeline", "tasks"):
        if settings(section):
            raise ExperimentRefused(
                f"its plan gives {section} settings {sorted(settings(section))}, which this "
                "project's experiments never do"
            )
    files = settings("api_layer")
    if files != {key: name for key, (name, _) in PICKLES.items()}:
        raise ExperimentRefused(f"its plan names the pickles {files}, not this project's")


def check_files(names: list[str], total_bytes: int) -> None:
    """ExperimentRefused unless the archive's members are files this project's client sends (no code, no path
    outside the experiment's folder) and not larger than ``MAX_ARCHIVE_BYTES`` together."""
    for name in names:
        path = PurePosixPath(name)
        if path.is_absolute() or ".." in path.parts or "\\" in name:
            raise ExperimentRefused(f"its archive has the path {name!r}, outside the experiment's folder")
        if name.endswith("/") or name in ARCHIVE_FILES or (path.parent.as_posix() == "save" and path.suffix == ".pbuf"):
            continue
        kind = "a Python file" if path.suffix in (".py", ".pyc", ".pyo", ".pyd", ".so", ".pth") else "a file"
        raise ExperimentRefused(f"its archive carries {kind} {name!r}, which this project's experiments never send")
    if total_bytes > MAX_ARCHIVE_BYTES:
        raise ExperimentRefused(f"its archive unpacks to {total_bytes / 2**20:.0f} MiB")


def requested_packages(text: str) -> list[str]:
    """The lines of a requirements file that ask pip for something (not blank, not a comment)."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def review_archive(archive: str, policy: SitePolicy) -> list[str]:
    """Review an experiment archive (a zip, as the director sends it) against ``policy``; ExperimentRefused says
    what is refused and why. Returns the packages it asks to install (only where the policy allows any)."""
    try:
        with zipfile.ZipFile(archive) as bundle:
            members = bundle.infolist()
            check_files([m.filename for m in members], sum(m.file_size for m in members))
            names = {m.filename for m in members}
            if PLAN_FILE not in names:
                raise ExperimentRefused(f"its archive has no {PLAN_FILE}")
            try:
                plan = yaml.safe_load(bundle.read(PLAN_FILE))
            except yaml.YAMLError as exc:
                raise ExperimentRefused(f"its plan is not plain YAML ({exc.__class__.__name__})") from exc
            check_plan(plan, policy)
            for key, (name, role) in PICKLES.items():
                if name not in names:
                    raise ExperimentRefused(f"its archive has no {name} ({role})")
                OBJECT_CHECKS[key](restricted_loads(bundle.read(name), role))
            packages = (
                requested_packages(bundle.read(REQUIREMENTS_FILE).decode("utf-8", "replace"))
                if REQUIREMENTS_FILE in names
                else []
            )
    except zipfile.BadZipFile as exc:
        raise ExperimentRefused(f"its archive is not a zip file ({exc})") from exc
    if packages and not policy.install_requirements:
        raise ExperimentRefused(
            f"it asks to install {len(packages)} package(s) ({', '.join(packages[:3])}"
            f"{', ...' if len(packages) > 3 else ''}), which this site's config does not allow "
            "(params.install_requirements: false)"
        )
    return packages


# --- the envoy ------------------------------------------------------------------------------------------------------


def say(line: str) -> None:
    """One line in the envoy's log (standard error, unwrapped)."""
    print(f"[site guard] {line}", file=sys.stderr, flush=True)


def make_guarded_envoy(policy_of: Callable[[Any], SitePolicy]) -> type:
    """OpenFL's Envoy whose experiment loop reviews each archive first (see the module's docstring);
    ``policy_of(envoy)`` gives the policy of an envoy once it is built."""
    from openfl.component.envoy.envoy import DEFAULT_RETRY_TIMEOUT_IN_SECONDS, Envoy
    from openfl.utilities.workspace import ExperimentWorkspace

    class GuardedWorkspace(ExperimentWorkspace):
        """OpenFL's experiment workspace, not put on ``sys.path``: nothing in an archive can be imported."""

        def __enter__(self) -> None:
            super().__enter__()
            while str(self.experiment_work_dir) in sys.path:
                sys.path.remove(str(self.experiment_work_dir))

    class GuardedEnvoy(Envoy):
        """An envoy that runs only experiments its ``SitePolicy`` accepts."""

        def __init__(self, **kwargs: Any) -> None:
            self.site_director_host, self.site_tls = str(kwargs["director_host"]), bool(kwargs.get("tls", True))
            super().__init__(**kwargs)
            self.policy = policy_of(self)
            self.refused: set[str] = set()

        def review(self, experiment: str, archive: str) -> bool:
            """True when ``experiment`` may run; else say why, tell the director, and False."""
            if self.policy.trust_client_code:
                say(f"{self.name}: experiment {experiment!r} is not reviewed: {TRUST_WARNING}")
                return True
            try:
                packages = review_archive(archive, self.policy)
            except ExperimentRefused as refusal:
                self.refuse(experiment, str(refusal))
                return False
            if packages:
                say(
                    f"{self.name}: experiment {experiment!r} installs {len(packages)} package(s), as this site's "
                    "config allows (params.install_requirements: true)"
                )
            return True

        def refuse(self, experiment: str, reason: str) -> None:
            line = f"{self.name} refused experiment {experiment!r}: {reason}"
            self.refused.add(experiment)
            say(line)
            try:
                self.director_client.set_experiment_failed(experiment, error_code=2, error_description=line)
            except Exception as exc:  # the director gone: nothing ran here, and the next wait retries
                logger.warning("could not tell the director that %r was refused: %s", experiment, exc)

        def run(self) -> None:
            """OpenFL's ``Envoy.run`` with ``review`` before the archive is unpacked (OpenFL 1.7.1)."""
            while True:
                try:
                    experiment = self.director_client.wait_experiment()
                    if experiment in self.refused:  # handed out again: neither fetched nor said twice
                        time.sleep(REFUSED_BACKOFF_SECONDS)
                        continue
                    data_stream = self.director_client.get_experiment_data(experiment)
                    # (OpenFL reads the stream outside its try: an archive the director has dropped meanwhile
                    # would end the envoy)
                    archive = self._save_data_stream_to_file(data_stream)
                except Exception as exc:
                    logger.exception("Failed to get experiment: %s", exc)
                    time.sleep(DEFAULT_RETRY_TIMEOUT_IN_SECONDS)
                    continue
                if not self.review(experiment, str(archive)):
                    archive.unlink(missing_ok=True)
                    continue
                trusted = self.policy.trust_client_code
                workspace = ExperimentWorkspace if trusted else GuardedWorkspace
                try:
                    with workspace(
                        experiment_name=f"{self.name}_{experiment}",
                        data_file_path=archive,
                        install_requirements=self.install_requirements if trusted else self.policy.install_requirements,
                    ):
                        self.is_experiment_running = True
                        self._run_collaborator()
                except ExperimentRefused as refusal:  # e.g. weights of another shape from the aggregator
                    self.refuse(experiment, str(refusal))
                except Exception as exc:
                    logger.exception("Collaborator failed with error: %s:", exc)
                    self.director_client.set_experiment_failed(
                        experiment, error_code=1, error_description=traceback.format_exc()
                    )
                finally:
                    self.is_experiment_running = False

    return GuardedEnvoy


def install_site_guard(trust_client_code: bool = False, install_requirements: bool = False) -> None:
    """Patch OpenFL 1.7.1 in this (envoy) process as the module's docstring says; ``install_requirements``: the
    site's config explicitly lets experiments install packages. With ``trust_client_code`` only the warning and
    the unreviewed loop (OpenFL's own behaviour, said in every experiment)."""
    from openfl.component.envoy import envoy as envoy_module
    from openfl.plugins.frameworks_adapters.pytorch_adapter import FrameworkAdapterPlugin
    from openfl.plugins.interface_serializer.cloudpickle_serializer import CloudpickleSerializer

    def policy_of(envoy: Any) -> SitePolicy:
        return SitePolicy(
            director_host=envoy.site_director_host,
            tls=envoy.site_tls,
            install_requirements=install_requirements,
            trust_client_code=trust_client_code,
        )

    envoy_module.Envoy = make_guarded_envoy(policy_of)  # OpenFL's CLI imports it from there when it starts
    if trust_client_code:
        say(TRUST_WARNING)
        return
    CloudpickleSerializer.restore_object = staticmethod(restricted_restore)
    set_tensor_dict = FrameworkAdapterPlugin.set_tensor_dict

    def checked_set_tensor_dict(model, tensor_dict, optimizer=None, device="cpu"):
        check_weights(model, tensor_dict)
        return set_tensor_dict(model, tensor_dict, optimizer, device)

    FrameworkAdapterPlugin.set_tensor_dict = staticmethod(checked_set_tensor_dict)


def install_director_guard(install_requirements: bool = False) -> None:
    """Patch OpenFL 1.7.1's director (this process) to review each experiment when a client submits it
    (``Director.set_new_experiment``): the director itself builds the plan's aggregator components and loads
    the task assigner and aggregation functions, so a refused experiment is answered "not accepted" at once,
    nothing of it runs at the director, and no envoy ever receives it. The envoys review again themselves (a
    site trusts no director for this)."""
    import asyncio

    from openfl.component.director.director import Director

    set_new_experiment = Director.set_new_experiment
    policy = SitePolicy(director_host=None, tls=None, install_requirements=install_requirements)

    async def reviewed_set_new_experiment(
        self, *, experiment_name: str, sender_name: str, experiment_archive_path: Any, **kwargs: Any
    ) -> bool:
        try:
            await asyncio.get_running_loop().run_in_executor(None, review_archive, str(experiment_archive_path), policy)
        except ExperimentRefused as refusal:
            say(f"the director refused experiment {experiment_name!r} from {sender_name}: {refusal}")
            experiment_archive_path.unlink(missing_ok=True)
            return False
        return await set_new_experiment(
            self,
            experiment_name=experiment_name,
            sender_name=sender_name,
            experiment_archive_path=experiment_archive_path,
            **kwargs,
        )

    Director.set_new_experiment = reviewed_set_new_experiment
