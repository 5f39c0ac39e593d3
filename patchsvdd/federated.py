"""OpenFL 1.7.1 adapter: the only module of ``patchsvdd`` that imports OpenFL.

Thin on purpose: the tasks call ``train_epoch`` and ``evaluate_category``
unchanged, so federated, local and tested code paths are the same.

Envoy side: ``MVTecDataInterface`` turns the envoy's shard descriptor into
arrays; ``train_task`` and ``validate_task`` run there on the envoy's own data
(validation scores an envoy's test images against its own training patches,
so no image leaves a site); ``export_task`` writes a site's inspection bundle
at the site. Notebook side: ``connect``, ``start_experiment``, ``follow_metrics``,
``fetch_last_model``, ``start_evaluation`` and ``start_export``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from openfl.interface.interactive_api.experiment import DataInterface, FLExperiment, ModelInterface, TaskInterface
from openfl.interface.interactive_api.federation import Federation

from .data import BUNDLE_FOLDER_LABEL, DEFECT_TYPES_LABEL, GOOD, CategoryData, holdout_split, standardise
from .evaluate import evaluate_category
from .metrics import AUPRO_KEYS, METRIC_KEYS, flatten_defects
from .model import PatchSVDD, count_parameters
from .supervise import director_listens
from .tls import TLSCheckError, check_mutual_tls, speaks_tls
from .train import TrainSettings, heldout_losses, make_optimizer, train_epoch

FRAMEWORK_ADAPTER = "openfl.plugins.frameworks_adapters.pytorch_adapter.FrameworkAdapterPlugin"
HELDOUT_METRIC = "heldout_pos"  # the model-choice criterion: needs no anomaly, lower is better
ROUND_METRICS = (HELDOUT_METRIC, "det_sum", "seg_sum")
FINAL_METRICS = METRIC_KEYS + AUPRO_KEYS
DEFECT_FUSION = "sum"  # the fusion whose image scores the final evaluation reports per defect type
EXPERIMENT_RECORD = "patchsvdd_experiment.json"  # written in an experiment's working folder; read by attach()


class FederationError(RuntimeError):
    """The federation did not do what was asked (refused, stalled, failed); the message says what and where to look."""


class DirectorGoneError(FederationError):
    """The director stopped answering during an experiment; its experiments are lost with it."""


# --------------------------------------------------------------------------- settings


@dataclass
class ExperimentSettings:
    """Everything an experiment needs besides the federation. Training defaults are the project's
    CPU recipe (``TrainSettings``); ``TrainSettings``'s docstring names the paper's.

    ``repeat``/``max_steps``: each training image is used ``repeat`` times per round,
    cut to ``max_steps`` steps when set; the learning-rate schedule runs over all
    rounds. ``holdout_fraction``: share of each envoy's good training images kept
    out of training; the position loss on them ('heldout_pos', lower is better)
    chooses the best model without any anomaly. ``search``: nearest-neighbour
    search of the per-round validation; ``final_search`` that of the final
    evaluation. ``idle_timeout``: seconds without any metric before giving up.
    """

    rounds: int = 5
    repeat: int = TrainSettings.repeat
    max_steps: int | None = None
    batch_size: int = TrainSettings.batch_size
    lr: float = TrainSettings.lr
    lambda_svdd: float = TrainSettings.lambda_svdd
    warmup_steps: int = TrainSettings.warmup_steps
    schedule: str = TrainSettings.schedule
    precision: str = TrainSettings.precision
    holdout_fraction: float = 0.1
    emb_dim: int = 64
    search: str = "fast"
    final_search: str = "exact"
    seed: int = 0
    device_policy: str = "CUDA_PREFERRED"
    opt_treatment: str = "CONTINUE_LOCAL"
    idle_timeout: float = 900.0

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"rounds={self.rounds}: at least one round")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps={self.max_steps}: at least 1 (None for whole epochs)")
        if self.device_policy not in ("CUDA_PREFERRED", "CPU_ONLY"):
            raise ValueError(f"device_policy={self.device_policy!r}: CUDA_PREFERRED or CPU_ONLY")
        for name in ("search", "final_search"):
            if getattr(self, name) not in ("exact", "fast"):
                raise ValueError(f"{name}={getattr(self, name)!r}: exact or fast")
        holdout_split(10, self.holdout_fraction)  # checks the fraction
        self.train_settings()  # checks the training settings

    def train_settings(self) -> TrainSettings:
        """The training part of these settings (the model's init is chosen where the model is built)."""
        return TrainSettings(
            lr=self.lr, lambda_svdd=self.lambda_svdd, batch_size=self.batch_size, repeat=self.repeat,
            warmup_steps=self.warmup_steps, schedule=self.schedule, precision=self.precision,
        )


# --------------------------------------------------------------------------- envoy side


@dataclass
class SiteData(CategoryData):
    """An envoy's shard (see ``CategoryData``) and the folder at its site where its bundles go (or None)."""

    bundle_folder: str | None = None


class MVTecDataInterface(DataInterface):
    """Gives the tasks the envoy's shard as a ``SiteData`` (uint8 arrays, decoded once)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._data: CategoryData | None = None

    @property
    def shard_descriptor(self):
        return self._shard_descriptor

    @shard_descriptor.setter
    def shard_descriptor(self, shard_descriptor) -> None:
        self._shard_descriptor = shard_descriptor
        train = shard_descriptor.get_dataset("train")
        test = shard_descriptor.get_dataset("test")
        test_items = [test[i] for i in range(len(test))]
        labels = np.array([item[2] for item in test_items], dtype=np.int64)
        # a shard descriptor of our own names each test image's defect type; another gets good/defective
        types = list(getattr(test, "defect_types", None) or ["defective" if label else "good" for label in labels])
        self._data = SiteData(
            bundle_folder=getattr(shard_descriptor, "bundle_folder", None),
            category=getattr(shard_descriptor, "category", "shard"),
            train_images=np.stack([train[i][0] for i in range(len(train))]),
            test_images=np.stack([item[0] for item in test_items]),
            test_masks=np.stack([item[1] for item in test_items]),
            test_labels=labels,
            defect_types=types,
            test_names=list(getattr(test, "names", None) or [f"{t}/{i}" for i, t in enumerate(types)]),
        )

    def get_train_loader(self, **kwargs: Any) -> CategoryData:
        return self._data

    def get_valid_loader(self, **kwargs: Any) -> CategoryData:
        return self._data

    def get_train_data_size(self) -> int:
        return len(self._data.train_images)

    def get_valid_data_size(self) -> int:
        return len(self._data.test_images)


def train_task(model, train_data, optimizer, device, round_num, train_settings, rounds, max_steps, seed, holdout_fraction) -> dict:
    """One round of local training on an envoy: ``train_epoch`` on its standardised training images
    less the held-out ones, at the global steps of this round in a schedule over ``rounds`` rounds."""
    model.to(device)
    fit, _ = holdout_split(len(train_data.train_images), holdout_fraction)
    images = standardise(train_data.train_images[fit], train_data.mean)
    steps = train_settings.steps_per_epoch(len(fit), max_steps)
    losses = train_epoch(
        model, images, optimizer, repeat=train_settings.repeat, batch_size=train_settings.batch_size,
        lambda_svdd=train_settings.lambda_svdd, max_steps=max_steps, generator=seed * 100_003 + int(round_num),
        schedule=train_settings.lr_schedule(rounds * steps), start_step=int(round_num) * steps,
        precision=train_settings.precision, progress=False,
    )
    return {"train_loss": losses["loss"], "pos_loss_64": losses["loss_pos_64"], "pos_loss_32": losses["loss_pos_32"],
            "spread_64": losses["spread_64"], "spread_32": losses["spread_32"]}


def validate_task(model, val_data, device, search, metric_names, holdout_fraction, defect_fusion=None,
                  defect_types=None) -> dict:
    """An envoy's view of the model: 'heldout_pos' (position loss on its held-out good training images;
    NaN without any) and AUROCs / AUPROs of its test images against its own training patches (NaN where
    undefined); with ``defect_fusion``, also that fusion's image-score statistics for each of
    ``defect_types`` as 'defect/<type>/<stat>' (NaN for a type this envoy lacks: the aggregator needs the
    same metrics from every envoy). Numbers only: the types are folder names, no image leaves."""
    model.to(device)
    out: dict[str, float] = {}
    if HELDOUT_METRIC in metric_names:
        _, held = holdout_split(len(val_data.train_images), holdout_fraction)
        out[HELDOUT_METRIC] = (heldout_losses(model, standardise(val_data.train_images[held], val_data.mean))[HELDOUT_METRIC]
                               if len(held) else math.nan)
    aurocs = [name for name in metric_names if name != HELDOUT_METRIC]
    if aurocs or defect_fusion:
        result = evaluate_category(model, val_data, mode=search, defect_names=defect_types,
                                   with_aupro=any(name.startswith("aupro_") for name in aurocs))
        out.update({name: math.nan if result.metrics[name] is None else result.metrics[name] for name in aurocs})
        if defect_fusion:
            out.update(flatten_defects(result.defects[defect_fusion]))
    return out


EXPORT_METRICS = ("image_threshold", "image_fpr", "image_tpr", "pixel_threshold", "calibrated", "bundle_mb",
                  "bank_rows_32")


def export_task(model, val_data, device, name, bank_fraction, max_fpr) -> dict:
    """Write this site's bundle (``name`` in its bundle folder) from ``model`` and its own images, calibrated
    on its own test images; report only numbers: thresholds, whether defects calibrated them, size."""
    from .bundle import bundle_bytes
    from .inspector import export_bundle

    if not getattr(val_data, "bundle_folder", None):
        raise FederationError("this envoy's shard descriptor names no bundle folder (shard_descriptor.params.bundle_folder)")
    model.to(device)
    out = Path(val_data.bundle_folder) / name
    inspector, _ = export_bundle(model, val_data, out, bank_fraction=bank_fraction, max_fpr=max_fpr,
                                 info={"experiment": name})
    image, pixel = inspector.image_threshold, inspector.pixel_threshold
    nan = math.nan
    return {"image_threshold": image.value, "image_fpr": nan if image.fpr is None else image.fpr,
            "image_tpr": nan if image.tpr is None else image.tpr, "pixel_threshold": pixel.value,
            "calibrated": float(image.method != "good_quantile"), "bundle_mb": bundle_bytes(out) / 1e6,
            "bank_rows_32": float(len(inspector.bundle.banks[32]))}


def build_tasks(settings: ExperimentSettings, metric_names: tuple[str, ...] = ROUND_METRICS, search: str | None = None) -> TaskInterface:
    """The task interface: ``train_task`` (with the optimizer) and ``validate_task``, with their settings."""
    tasks = TaskInterface()
    tasks.add_kwargs(
        train_settings=settings.train_settings(), rounds=settings.rounds, max_steps=settings.max_steps,
        seed=settings.seed, holdout_fraction=settings.holdout_fraction,
    )(train_task)
    tasks.register_fl_task(model="model", data_loader="train_data", device="device", optimizer="optimizer", round_num="round_num")(train_task)
    tasks.add_kwargs(search=search or settings.search, metric_names=tuple(metric_names),
                     holdout_fraction=settings.holdout_fraction)(validate_task)
    tasks.register_fl_task(model="model", data_loader="val_data", device="device")(validate_task)
    return tasks


class TrainThenValidate:
    """Task assigner: ``training_rounds`` rounds of train + validate, then one validation-only round.

    OpenFL 1.7.1 validates the model a round *starts* with and keeps that one
    as "last", so the aggregate of the final training round would be neither
    validated nor returned; the extra round fixes both. The locally-tuned
    validation of OpenFL's default assigner is left out: it doubles the cost
    of validation for a number nobody aggregates.
    """

    def __init__(self, tasks: TaskInterface, training_rounds: int) -> None:
        registered = tasks.get_registered_tasks()
        self.train = registered["train"]
        self.validate = registered["aggregated_model_validate"]
        self.training_rounds = training_rounds

    def __call__(self, collaborators, round_number, **kwargs) -> dict:
        tasks = [self.train, self.validate] if round_number < self.training_rounds else [self.validate]
        return {name: list(tasks) for name in collaborators}


def validation_only_tasks(settings: ExperimentSettings, defect_types: list[str] | None = None) -> TaskInterface:
    """Tasks of the final evaluation: only ``validate_task``: the eight AUROCs, the AUPROs and, given the
    ``defect_types`` of all envoys, the per-defect statistics, with ``final_search``."""
    tasks = TaskInterface()
    tasks.add_kwargs(search=settings.final_search, metric_names=FINAL_METRICS, holdout_fraction=settings.holdout_fraction,
                     defect_fusion=DEFECT_FUSION if defect_types else None,
                     defect_types=defect_types)(validate_task)
    tasks.register_fl_task(model="model", data_loader="val_data", device="device")(validate_task)
    return tasks


# --------------------------------------------------------------------------- notebook side


class DirectorFederation(Federation):
    """OpenFL's ``Federation`` that also remembers the director's port (for messages and probes)."""

    def __init__(self, *, director_port: int, **kwargs: Any) -> None:
        super().__init__(director_port=director_port, **kwargs)
        self.director_port = int(director_port)


def connect(
    host: str, port: int, tls: bool = False, cert_chain: str | None = None, api_cert: str | None = None,
    api_private_key: str | None = None, client_id: str = "frontend",
) -> Federation:
    """A ``Federation`` handle on the director at ``host:port``; TLS files are needed only with ``tls=True``.

    One handshake first, so that an unreachable director, a TLS mismatch or a
    refused certificate raise FederationError with a plain sentence at once.
    """
    try:
        if tls:
            for name, path in (("cert_chain", cert_chain), ("api_cert", api_cert), ("api_private_key", api_private_key)):
                if not path or not Path(path).is_file():
                    raise FederationError(f"TLS is on but {name} {path!r} is not a file")
            check_mutual_tls(host, int(port), cert_chain, api_cert, api_private_key)
        elif speaks_tls(host, int(port)):
            raise FederationError(f"the director at {host}:{port} requires TLS: set tls=True with cert_chain, "
                                  "api_cert and api_private_key")
    except TLSCheckError as exc:
        raise FederationError(str(exc)) from exc
    return DirectorFederation(
        client_id=client_id, director_node_fqdn=host, director_port=int(port), tls=tls,
        cert_chain=cert_chain, api_cert=api_cert, api_private_key=api_private_key,
    )


def _shard_registry(federation: Federation, settle: float = 15.0) -> dict[str, Any]:
    """The director's shard registry. OpenFL 1.7.1's director fails this call with a KeyError while an envoy
    has registered but not yet asked for work (a second or so); such answers are retried for ``settle`` s."""
    import grpc

    deadline = time.monotonic() + settle
    while True:
        try:
            return federation.get_shard_registry()
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNKNOWN or "KeyError" not in str(exc.details()) or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def shard_table(federation: Federation) -> list[dict[str, Any]]:
    """One row per envoy the director knows: name, online, description, shapes."""
    rows = []
    for name, info in _shard_registry(federation).items():
        shard = info["shard_info"]
        rows.append({
            "envoy": name,
            "online": bool(info["is_online"]),
            "description": shard.shard_description,
            "sample_shape": list(shard.sample_shape),
            "target_shape": list(shard.target_shape),
        })
    return rows


def wait_for_envoys(federation: Federation, count: int, timeout: float = 120.0, poll: float = 1.0) -> list[dict[str, Any]]:
    """Poll the shard registry until ``count`` envoys are online; FederationError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        rows = shard_table(federation)
        if sum(r["online"] for r in rows) >= count:
            return rows
        if time.monotonic() > deadline:
            names = ", ".join(r["envoy"] for r in rows if r["online"]) or "none"
            raise FederationError(f"only {names} online after {timeout:.0f} s; expected {count} envoys (see the envoy logs)")
        time.sleep(poll)


def describe_model(model: PatchSVDD) -> str:
    """A short text: K, strides, grids on 256x256 images, parameters and the layers."""
    return (
        f"Patch SVDD, D={model.emb_dim}: K=64 at stride {model.strides[64]} (13x13 grid), "
        f"K=32 at stride {model.strides[32]} (57x57 grid), {count_parameters(model):,} parameters\n{model}"
    )


@contextlib.contextmanager
def working_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Run the block inside ``path``: OpenFL writes plan/, save/, *_obj.pkl there and ships that folder."""
    path = Path(path).resolve()
    path.mkdir(parents=True, exist_ok=True)
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield path
    finally:
        os.chdir(previous)


def _submit(federation, name, model, settings, tasks, rounds, workdir, assigner=None) -> FLExperiment:
    model_interface = ModelInterface(model=model, optimizer=make_optimizer(model, settings.lr), framework_plugin=FRAMEWORK_ADAPTER)
    with working_folder(workdir):
        experiment = FLExperiment(federation=federation, experiment_name=name)
        experiment.start(
            model_provider=model_interface, task_keeper=tasks, data_loader=MVTecDataInterface(), rounds_to_train=rounds,
            task_assigner=assigner, opt_treatment=settings.opt_treatment, device_assignment_policy=settings.device_policy,
        )
    if not experiment.experiment_submitted:
        raise FederationError(f"the director did not accept experiment {name!r} (is another one still running? see the director log)")
    record = {"name": name, "participants": list(experiment.plan.authorized_cols), "rounds": rounds}
    (Path(workdir) / EXPERIMENT_RECORD).write_text(json.dumps(record, indent=1))
    return experiment


def start_experiment(
    federation: Federation, model: PatchSVDD, settings: ExperimentSettings, name: str, workdir: str | os.PathLike
) -> FLExperiment:
    """Send a training experiment to the director: ``settings.rounds`` rounds of train + validate, then
    a validation-only round for the final aggregate (reported as round ``settings.rounds``)."""
    tasks = build_tasks(settings)
    assigner = TrainThenValidate(tasks, settings.rounds)
    return _submit(federation, name, model, settings, tasks, settings.rounds + 1, workdir, assigner)


def start_evaluation(
    federation: Federation, model: PatchSVDD, settings: ExperimentSettings, name: str, workdir: str | os.PathLike
) -> FLExperiment:
    """Send a one-round, validation-only experiment: every envoy scores ``model`` on its own data (AUROCs,
    AUPROs, and image-score statistics per defect type where the envoys' shard descriptions name the types)."""
    types = shard_defect_types(federation)
    return _submit(federation, name, model, settings, validation_only_tasks(settings, types), 1, workdir)


def start_export(
    federation: Federation, model: PatchSVDD, settings: ExperimentSettings, name: str, workdir: str | os.PathLike,
    bank_fraction: float = 1.0, max_fpr: float | None = None,
) -> FLExperiment:
    """Send a one-round experiment in which every envoy writes its own inspection bundle of ``model`` (folder
    ``name`` in its bundle folder) from its own images and reports only its thresholds and the bundle's size
    (``EXPORT_METRICS``). No image and no embedding leaves a site."""
    tasks = TaskInterface()
    tasks.add_kwargs(name=name, bank_fraction=bank_fraction, max_fpr=max_fpr)(export_task)
    tasks.register_fl_task(model="model", data_loader="val_data", device="device")(export_task)
    return _submit(federation, name, model, settings, tasks, 1, workdir)


def _described(description: str, label: str) -> str | None:
    """The text after ``label`` in a shard description's '; '-separated parts, or None."""
    for part in str(description).split("; "):
        if part.startswith(label):
            return part[len(label):].strip()
    return None


def shard_defect_types(federation: Federation) -> list[str] | None:
    """The union of the defect types the online envoys' shard descriptions list ('good' first), or None
    when some envoy's description lists none (a shard descriptor other than this project's)."""
    types = {GOOD}
    for row in shard_table(federation):
        if not row["online"]:
            continue
        listed = _described(row["description"], DEFECT_TYPES_LABEL)
        if listed is None:
            return None
        types.update(t.strip() for t in listed.split(",") if t.strip() and t.strip() != "none")
    return [GOOD, *sorted(types - {GOOD})]


def shard_bundle_folders(federation: Federation) -> dict[str, str | None]:
    """{envoy: the bundle folder at its site, as its shard description says (None where it does not)}."""
    return {row["envoy"]: _described(row["description"], BUNDLE_FOLDER_LABEL) for row in shard_table(federation)}


def experiment_status(federation: Federation, name: str) -> str | None:
    """The director's status of experiment ``name`` of this client: pending, in_progress, finished, failed,
    rejected; None when the director has no such experiment for this client."""
    status = federation.dir_client.get_experiment_status(name).experiment_status
    return status or None


def attach(federation: Federation, name: str, model: PatchSVDD, workdir: str | os.PathLike) -> FLExperiment:
    """Take up experiment ``name`` again after the notebook lost its connection (kernel restart, network).

    ``workdir`` is the folder the experiment was started from; ``model`` any
    PatchSVDD of the same shape (its weights are replaced when models are
    fetched). The director keeps the metrics nobody has read yet: the next
    ``follow_metrics`` streams them, then the rest of the experiment. Connect
    with the same client id (or certificate) as the one that started it.
    """
    record_file = Path(workdir) / EXPERIMENT_RECORD
    if not record_file.is_file():
        raise FederationError(f"{record_file} not found: attach from the working folder experiment {name!r} was started in")
    record = json.loads(record_file.read_text())
    if record["name"] != name:
        raise FederationError(f"{record_file} records experiment {record['name']!r}, not {name!r}")
    status = experiment_status(federation, name)
    if status is None:
        raise FederationError(f"the director has no experiment {name!r} of this client: it was restarted since "
                              "(experiments do not survive a director restart) or another client id started it")
    from openfl.federated.plan.plan import Plan

    model_interface = ModelInterface(model=model, optimizer=make_optimizer(model), framework_plugin=FRAMEWORK_ADAPTER)
    with working_folder(workdir) as folder:
        experiment = FLExperiment(federation=federation, experiment_name=name)
        experiment.plan = Plan.parse(folder / "plan" / "plan.yaml", resolve=False)
        experiment.plan.authorized_cols = list(record["participants"])
        experiment.restore_experiment_state(model_interface)
    return experiment


@dataclass
class MetricLog:
    """Metrics as streamed: dicts with round, metric_origin, task_name, metric_name, metric_value."""

    records: list[dict[str, Any]] = field(default_factory=list)

    def series(self, task_name: str, metric_name: str) -> dict[str, list[tuple[int, float]]]:
        """{origin: [(round, value), ...]} for one task and metric."""
        out: dict[str, list[tuple[int, float]]] = {}
        for r in self.records:
            if r["task_name"] == task_name and r["metric_name"] == metric_name:
                out.setdefault(r["metric_origin"], []).append((int(r["round"]), float(r["metric_value"])))
        return out

    def final(self, task_name: str = "aggregated_model_validate") -> dict[str, dict[str, float]]:
        """{origin: {metric: value}} from the last round each origin reported for ``task_name``."""
        out: dict[str, dict[str, tuple[int, float]]] = {}
        for r in self.records:
            if r["task_name"] == task_name:
                slot = out.setdefault(r["metric_origin"], {})
                if r["metric_name"] not in slot or slot[r["metric_name"]][0] <= r["round"]:
                    slot[r["metric_name"]] = (int(r["round"]), float(r["metric_value"]))
        return {origin: {k: v for k, (_, v) in metrics.items()} for origin, metrics in out.items()}

    def to_jsonable(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.records]


def follow_metrics(
    experiment: FLExperiment, idle_timeout: float = 900.0, on_metric: Callable[[dict[str, Any]], None] | None = None,
    checkpointer: SaveWhenImproved | None = None, registry_poll: float = 5.0, pending_timeout: float = 300.0,
) -> MetricLog:
    """Collect the experiment's metrics until it ends; ``on_metric`` sees each, ``checkpointer`` saves improvements.

    While waiting, the shard registry and the experiment's status are read
    every ``registry_poll`` seconds. Raises FederationError as soon as an envoy
    of the experiment is offline, when the experiment still waits behind
    another one after ``pending_timeout`` seconds, when no metric arrives for
    ``idle_timeout`` seconds, or when the experiment ends in failure;
    DirectorGoneError when the director stops answering.
    """
    import grpc
    from openfl.protocols import director_pb2

    log = MetricLog()
    inbox: queue.Queue = queue.Queue()
    name = experiment.experiment_name
    request = director_pb2.GetMetricStreamRequest(experiment_name=name)
    call = experiment.federation.dir_client.stub.GetMetricStream(request)
    done = object()

    def pump() -> None:
        try:
            for message in call:
                inbox.put({
                    "round": int(message.round), "metric_origin": message.metric_origin, "task_name": message.task_name,
                    "metric_name": message.metric_name, "metric_value": float(message.metric_value),
                })
            inbox.put(done)
        except Exception as exc:  # gRPC errors arrive here; re-raised below
            inbox.put(exc)

    def give_up(error: FederationError) -> FederationError:
        call.cancel()
        return error

    threading.Thread(target=pump, name="metric-stream", daemon=True).start()
    participants = set(experiment.plan.authorized_cols)
    last_progress = time.monotonic()
    pending_since: float | None = None
    while True:
        try:
            item = inbox.get(timeout=min(idle_timeout, registry_poll))
        except queue.Empty:
            try:
                online = {r["envoy"] for r in shard_table(experiment.federation) if r["online"]}
                status = experiment_status(experiment.federation, name)
            except grpc.RpcError as exc:
                raise give_up(_director_gone(experiment, checkpointer, exc)) from None
            if participants - online:
                raise give_up(FederationError(
                    f"experiment {name!r}: envoy {', '.join(sorted(participants - online))} went "
                    "offline during the experiment, which cannot finish without it. Restart the envoy and the director, "
                    "then start a new experiment from the last checkpoint (the notebook's initial_checkpoint)."
                ))
            pending_since = (pending_since or time.monotonic()) if status == "pending" else None
            if pending_since is not None and time.monotonic() - pending_since > pending_timeout:
                raise give_up(FederationError(
                    f"experiment {name!r} has waited {pending_timeout:.0f} s behind another experiment on the director, "
                    "which runs one at a time and cannot stop one (OpenFL 1.7.1). If that one is stuck (an envoy died), "
                    "restart the director: the envoys register again by themselves."
                ))
            if time.monotonic() - last_progress > idle_timeout:
                raise give_up(FederationError(
                    f"experiment {name!r}: no metric for {idle_timeout:.0f} s although every envoy "
                    f"is online (status {status}); see the director and envoy logs."
                ))
            continue
        last_progress = time.monotonic()
        if item is done:
            break
        if isinstance(item, Exception):
            if isinstance(item, grpc.RpcError) and item.code() == grpc.StatusCode.UNAVAILABLE:
                raise _director_gone(experiment, checkpointer, item) from None
            raise FederationError(f"experiment {name!r}: metric stream broke: {item}") from item
        log.records.append(item)
        if on_metric is not None:
            on_metric(item)
        if checkpointer is not None:
            checkpointer.observe(item)
    if checkpointer is not None:
        checkpointer.finish()
    status = experiment.get_experiment_status()
    if status is not None and str(status).lower() == "failed":
        raise FederationError(f"experiment {name!r} failed on the director (see its log)")
    return log


def _listens_within(host: str, port: int, seconds: float) -> bool:
    """False once the port refuses connections within ``seconds`` (a killed process takes a moment to close it)."""
    deadline = time.monotonic() + seconds
    while director_listens(host, port, timeout=1.0):
        if time.monotonic() > deadline:
            return True
        time.sleep(0.2)
    return False


def _director_gone(experiment: FLExperiment, checkpointer: SaveWhenImproved | None, cause: Exception) -> DirectorGoneError:
    """The sentence for a director that stopped answering (process ended, machine or network down)."""
    federation = experiment.federation
    host, port = federation.director_node_fqdn, getattr(federation, "director_port", None)
    where = f"{host}:{port}" if port else host
    gone = port is not None and not _listens_within(host, int(port), seconds=5.0)
    state = "does not listen any more" if gone else f"stopped answering ({getattr(cause, 'details', lambda: cause)()})"
    saved = ""
    if checkpointer is not None and checkpointer.saved_round is not None:
        saved = f" The best model so far (round {checkpointer.saved_round}) is saved in {checkpointer.path}."
    return DirectorGoneError(
        f"experiment {experiment.experiment_name!r}: the director at {where} {state}; the experiment is lost with it."
        f"{saved} Start the director again: envoys started with start_envoy.sh wait for it and register again by "
        "themselves. Then connect again and start a new experiment from the last checkpoint (initial_checkpoint)."
    )


class SaveWhenImproved:
    """Saves the validated aggregate atomically each time it beats the best so far (pass to ``follow_metrics``).

    The criterion is ``metric`` of the aggregator's validation: by default the
    held-out position loss ('heldout_pos', lower is better), which needs no
    anomalous image, so the test images whose AUROC is reported never choose
    the model. Round r's aggregated validation scores the model round r started
    with; the director holds that model as "last" from the end of round r until
    the end of round r+1. So an improvement seen in round r is saved when the
    first metric of a later round arrives (round r+1 is then under way), or
    when the experiment ends. ``save_checkpoint`` writes a temporary file and
    renames it: a crash never leaves a broken file. ``metadata`` goes into the
    file, with the round and the score.
    """

    def __init__(self, experiment: FLExperiment, path: str | os.PathLike, /, metric: str = HELDOUT_METRIC,
                 lower_is_better: bool = True, **metadata: Any) -> None:
        self.experiment, self.path, self.metric, self.metadata = experiment, Path(path), metric, metadata
        self.lower_is_better = lower_is_better
        self.best_score = math.inf if lower_is_better else -math.inf
        self.best_round: int | None = None
        self.saved_round: int | None = None  # round of the model in ``path``, once written
        self._pending: tuple[int, float] | None = None

    def _better(self, score: float) -> bool:
        return not math.isnan(score) and (score < self.best_score if self.lower_is_better else score > self.best_score)

    def observe(self, record: dict[str, Any]) -> None:
        if self._pending is not None and record["round"] > self._pending[0]:
            self._save()
        key = (record["metric_origin"], record["task_name"], record["metric_name"])
        score = record["metric_value"]
        if key == ("aggregator", "aggregated_model_validate", self.metric) and self._better(score):
            self.best_score, self.best_round = score, int(record["round"])
            self._pending = (self.best_round, score)

    def finish(self) -> None:
        if self._pending is not None:
            self._save()

    def _save(self) -> None:
        from .checkpoint import save_checkpoint

        round_number, score = self._pending
        self._pending = None
        model = self.experiment.get_last_model()
        save_checkpoint(model, self.path, round=round_number, score=float(score), metric=self.metric, **self.metadata)
        self.saved_round = round_number


def fetch_last_model(experiment: FLExperiment) -> PatchSVDD:
    """The final aggregated model from the director, on the CPU. (OpenFL's own "best" model is not used:
    it keeps the highest of all validation metrics at once; ``SaveWhenImproved`` chooses instead.)"""
    return experiment.get_last_model()


def settings_dict(settings: ExperimentSettings) -> dict[str, Any]:
    """Plain dict of the settings, for checkpoint metadata and reports."""
    return asdict(settings)
