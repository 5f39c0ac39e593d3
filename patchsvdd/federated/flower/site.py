"""A site on Flower: the process beside a SuperNode that runs this project's tasks, and nothing else.

``envoy_folder/start_supernode.sh NAME CONFIG`` starts ``flower-supernode --isolation process`` (which then
runs no app itself) and this module's ``serve`` against the SuperNode's runtime API on loopback. For each task
the SuperNode has received, ``serve``:

1. compares the run's FAB hash with ``app.app_hash()`` of the site's own installed code; any other app is
   refused with a sentence in the reply, before its FAB is read, and nothing of it is installed or run;
2. otherwise runs ``client_app`` (this module's, imported from the installed package) in this process: the
   task's manifest is parsed and checked (``manifest.parse_manifest``), the model is built from the site's
   code (``site_model``), the weights are checked against it (``check_weights``), and the task runs on the
   site's shard, read from the same YAML config the OpenFL envoy reads (``shard_descriptor.params``).

Numbers go back, and weights after training; no image leaves. The shard is decoded once per process; each
experiment keeps its model and Adam state across rounds (OpenFL's ``CONTINUE_LOCAL``) and, with
``local_heads``, the site's own heads.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output
from torch import nn

from patchsvdd.data.mvtec import (
    CategoryData,
    MVTecDataError,
    index_category,
    load_category,
    parse_rank_worldsize,
)
from patchsvdd.federated.flower import records, secagg
from patchsvdd.federated.flower.app import app_hash
from patchsvdd.federated.manifest import ExperimentManifest
from patchsvdd.federated.names import ExperimentRefused
from patchsvdd.federated.progress import VALIDATION
from patchsvdd.federated.site_model import check_weights, expected_weights, site_model
from patchsvdd.federated.site_tasks import (
    SiteData,
    SiteError,
    export_task,
    final_validation,
    round_validation,
    train_task,
    validate_task,
)
from patchsvdd.system.configs import ConfigError, check_envoy_config, resolve_data_folder
from patchsvdd.training.loop import make_optimizer

log = logging.getLogger("patchsvdd.site")
KEPT_EXPERIMENTS = 4  # experiments a site keeps between rounds (a notebook session: training, evaluation, export)
NAME_KEY, CONFIG_KEY = "name", "shard-config"  # the SuperNode's --node-config keys this site reads
REFUSED = "refused by site {site}: it runs only this project's app ({own}...), and this run's app is {other}..."


@dataclass
class Experiment:
    """What a site keeps of one experiment between its rounds: the manifest (as sent), the model and its Adam,
    and the site's data with the heads it keeps (``local_heads``)."""

    manifest_json: bytes
    manifest: ExperimentManifest
    model: nn.Module
    optimizer: torch.optim.Optimizer
    data: SiteData
    expected: dict[str, tuple[int, ...]]


class Site:
    """One site's shard (from its envoy config) and its experiments."""

    def __init__(self, name: str, config_path: Path) -> None:
        self.name, self.config_path = name, Path(config_path)
        self.config = check_envoy_config(self.config_path, check_data=False, engine="flower")
        self.masked_only = self.config.get("secure_aggregation") == "required"
        params = self.config["shard_descriptor"]["params"]
        self.category = str(params["category"])
        self.bundle_folder = str(resolve_data_folder(params.get("bundle_folder", "bundles"), self.config_path.parent))
        self._params = params
        self._data: SiteData | None = None
        self.experiments: OrderedDict[tuple[int, str], Experiment] = OrderedDict()  # the latest last

    @property
    def data(self) -> SiteData:
        """The site's shard, decoded on first use (ConfigError naming the config when it cannot be read)."""
        if self._data is None:
            params = self._params
            try:
                rank, world = parse_rank_worldsize(str(params.get("rank_worldsize", "1,1")))
                folder = resolve_data_folder(params["data_folder"], self.config_path.parent)
                index = index_category(folder, self.category).shard(rank, world)
                shard: CategoryData = load_category(index, size=int(params.get("image_size", 256)))
            except MVTecDataError as exc:
                raise ConfigError(f"{self.config_path}: shard_descriptor.params: {exc}") from exc
            fields = {f.name: getattr(shard, f.name) for f in dataclasses.fields(CategoryData)}
            self._data = SiteData(**fields, bundle_folder=self.bundle_folder)
        return self._data

    def device(self, manifest: ExperimentManifest) -> torch.device:
        """CUDA (the config's first ``cuda_devices``) where the policy prefers it and torch sees it, else CPU."""
        gpus = (self.config.get("params") or {}).get("cuda_devices") or []
        if manifest.settings.device_policy == "CUDA_PREFERRED" and gpus and torch.cuda.is_available():
            return torch.device(f"cuda:{gpus[0]}")
        return torch.device("cpu")

    def describe(self) -> dict[str, Any]:
        """The site's name and shard, as the driver's site table shows them."""
        data = self.data
        types = sorted(set(data.defect_types) - {"good"})
        return {
            "envoy": self.name,
            "category": self.category,
            "train_size": len(data.train_images),
            "test_size": len(data.test_images),
            "defective": int(data.test_labels.sum()),
            "defect_types": ",".join(types),
            "bundle_folder": self.bundle_folder,
            "image_shape": ",".join(map(str, data.train_images.shape[1:])),
        }

    def experiment(self, run_id: int, content: RecordDict) -> tuple[Experiment, int]:
        """The experiment a task message belongs to (made at its first message) with the sent weights loaded,
        and the message's round; ExperimentRefused or RecordError for anything but what this project sends."""
        manifest, name, number = records.read_task(content)
        key = (run_id, name)
        known = self.experiments.get(key)
        text = manifest.to_json()
        if known is not None and known.manifest_json != text:
            raise ExperimentRefused(f"experiment {name} changed its manifest between rounds")
        if known is None:
            model = site_model(manifest)
            known = Experiment(
                text,
                manifest,
                model,
                make_optimizer(model, manifest.settings.lr),
                dataclasses.replace(self.data),  # its own heads (local_heads): a copy of the shard's fields
                expected_weights(manifest),
            )
            self.experiments[key] = known
            while len(self.experiments) > KEPT_EXPERIMENTS:
                self.experiments.popitem(last=False)  # the one least recently used goes, with its model and Adam
        self.experiments.move_to_end(key)
        arrays = records.record_weights(content)
        check_weights(known.expected, arrays, "the driver")
        with torch.no_grad():
            for key_name, tensor in known.model.state_dict().items():
                tensor.copy_(torch.from_numpy(arrays[key_name]))
        return known, number

    def sizes(self) -> records.MetricRecord:
        return records.metrics_record(
            {"train_size": len(self.data.train_images), "test_size": len(self.data.test_images)}
        )

    def run(self, message_type: str, run_id: int, content: RecordDict, masked: bool = False) -> RecordDict:
        """Run one task message of this project (``train``, ``evaluate``, ``query.export``); ``masked``: a
        training round's weights leave through secure aggregation (``secagg``), not as they are."""
        experiment, number = self.experiment(run_id, content)
        manifest, model, data = experiment.manifest, experiment.model, experiment.data
        if message_type == "train" and not masked and (self.masked_only or manifest.settings.secure_aggregation):
            why = "its config requires" if self.masked_only else "the experiment asks for"
            raise ExperimentRefused(
                f"site {self.name} sends trained weights only masked, through secure aggregation ({why} it), "
                "and this round asks for them as they are"
            )
        device = self.device(manifest)
        out = RecordDict({records.SIZES: self.sizes()})
        if manifest.task == "export" and message_type == "query.export":
            assert manifest.export is not None
            values = export_task(
                model, data, device, manifest.export.name, manifest.export.bank_fraction, manifest.export.max_fpr
            )
            out[VALIDATION] = records.metrics_record(values)
            return out
        if manifest.task == "evaluation" and message_type == "evaluate":
            defect_types = None if manifest.defect_types is None else list(manifest.defect_types)
            values = validate_task(model, data, device, **final_validation(manifest.settings, defect_types))
            out[VALIDATION] = records.metrics_record(values)
            return out
        if manifest.task != "training" or message_type not in ("train", "evaluate"):
            raise ExperimentRefused(f"a {message_type} message does not belong to a {manifest.task} experiment")
        # the model a round starts with is validated first (as OpenFL's assigner has it), then trained
        out[VALIDATION] = records.metrics_record(
            validate_task(model, data, device, **round_validation(manifest.settings))
        )
        if message_type == "train":
            if number >= manifest.training_rounds:
                raise ExperimentRefused(
                    f"round {number} of an experiment of {manifest.training_rounds} training rounds"
                )
            values = train_task(model, data, experiment.optimizer, device, number, manifest.settings)
            out[records.TRAIN] = records.metrics_record(values)
            out[records.ARRAYS] = records.weights_record(model.state_dict())
        return out


def weight_names(task: RecordDict) -> list[str]:
    """The names of a task's model weights, in the order both sides list them (the manifest's model)."""
    manifest, _, _ = records.read_task(task)
    return list(expected_weights(manifest))


_SITES: dict[tuple[str, str], Site] = {}
_SITES_LOCK = threading.Lock()


def register(site: Site) -> None:
    """Make ``site`` the one a SuperNode's node config (its name and this config path) refers to."""
    with _SITES_LOCK:
        _SITES[(site.name, str(site.config_path))] = site


def site_of(context: Context) -> Site:
    """The site this SuperNode serves, from its own ``--node-config`` (name and shard config), made once."""
    name, config = context.node_config.get(NAME_KEY), context.node_config.get(CONFIG_KEY)
    if not isinstance(name, str) or not isinstance(config, str):
        raise SiteError(
            f"the SuperNode's --node-config names no {NAME_KEY}=... and {CONFIG_KEY}=... (start_supernode.sh)"
        )
    with _SITES_LOCK:
        if (name, config) not in _SITES:
            _SITES[(name, config)] = Site(name, Path(config))
        return _SITES[(name, config)]


client_app = ClientApp()


@client_app.query("describe")
def describe(message: Message, context: Context) -> Message:
    site = site_of(context)
    return Message(RecordDict({records.SITE: ConfigRecord(site.describe())}), reply_to=message)


@client_app.train()
def train(message: Message, context: Context) -> Message:
    site, run_id = site_of(context), message.metadata.run_id
    if secagg.is_secagg(message.content):
        return secagg.masked_train(
            message, context, lambda task: site.run("train", run_id, task, masked=True), weight_names
        )
    return Message(site.run("train", run_id, message.content), reply_to=message)


@client_app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    return Message(site_of(context).run("evaluate", message.metadata.run_id, message.content), reply_to=message)


@client_app.query("export")
def export(message: Message, context: Context) -> Message:
    return Message(site_of(context).run("query.export", message.metadata.run_id, message.content), reply_to=message)


def _runtime_client(address: str, *interceptors: Any) -> RuntimeHttpClient:
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,  # the SuperNode's runtime API on loopback, as Flower's own SuperExec reaches it
        root_certificates=None,
        interceptors=list(interceptors),
        retry_invoker=make_simple_http_retry_invoker(),
    )


def run_task(address: str, token: str, own_hash: str, site_name: str) -> str:
    """Run one task the SuperNode handed out (``token``): this project's app, or a refusal; returns what was done."""
    client = _runtime_client(
        address, RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), RuntimeTokenHttpInterceptor(token)
    )
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    context = None
    status, details = SubStatus.FAILED, "the site stopped the task"
    try:
        message, context, run, fab = pull_task_input(client)
        if run.fab_hash != own_hash:
            reason = REFUSED.format(site=site_name, own=own_hash[:12], other=run.fab_hash[:12])
            log.warning("%s (run %s, %s %s)", reason, run.run_id, run.fab_id, run.fab_version)
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)
            details, outcome = reason, "refused"
        else:
            try:
                reply = client_app(message=message, context=context)
                status, details, outcome = SubStatus.COMPLETED, "", f"ran {message.metadata.message_type}"
            except Exception as exc:  # the reason goes back to the driver as a sentence; the site keeps serving
                reason = f"site {site_name}: {type(exc).__name__}: {exc}"
                log.exception("task of run %s failed", run.run_id)
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)
                details, outcome = reason, "failed"
        push_message(client, reply, context)
        return outcome
    finally:
        push_task_output(client=client, context=context, sub_status=status, details=details)
        heartbeat.stop()
        client.close()


def serve(address: str, site_name: str, poll: float = 0.05, stop: threading.Event | None = None) -> None:
    """Take the SuperNode's tasks at ``address`` (its runtime API) one at a time until ``stop`` is set."""
    own = app_hash()
    log.info("site %s serves app %s from %s", site_name, own, address)
    client = _runtime_client(address, RuntimeVersionHttpInterceptor(component_name="SuperExec"))
    stop = stop or threading.Event()
    while not stop.is_set():
        task = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
        if task.HasField("task") and task.token:
            outcome = run_task(address, task.token, own, site_name)
            log.info("run %s: %s", task.task.run_id, outcome)
        else:
            stop.wait(poll)
