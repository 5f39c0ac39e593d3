"""The data scientist's side of Flower: ``FlowerEngine``, an engine of ``patchsvdd.experiment``.

``FlowerEngine.connect`` submits one run of the project's app (``flwr run``, the FAB of ``app.py``) to the
SuperLink and takes that run's ServerApp task itself, with the SuperLink's SuperExec secret: the SuperLink
(``director_folder/start_superlink.sh``, ``--isolation process``) then runs no app code at all, and the
experiment's ServerApp role runs here, in the caller's process. Every experiment of the session (training,
evaluation, export) goes through that run's grid:

- ``sites``: a ``describe`` query to every SuperNode: its site's name and shard;
- ``start``: a ``FlowerRun`` of a manifest. Round r sends each site the model round r starts with; the site
  validates it and, in a training round, trains it; FedAvg (weights: the sites' training image counts, as
  OpenFL's) makes round r+1's model. The metrics arrive as OpenFL's engine streams them (``MetricLog``
  records: each site's, then the aggregate as 'aggregator', weighted by test image counts for validation).

A site that refuses a task answers with a sentence, which ``FederationError`` carries.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.constant import SubStatus
from flwr.common.serde import context_from_proto, context_to_proto, fab_from_proto, run_from_proto
from flwr.proto.runtime_pb2 import AcquireTaskRequest, PullTaskInputRequest, PushTaskOutputRequest
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.grid import HttpGrid
from torch import nn

from patchsvdd.federated.flower import mtls, records, secagg
from patchsvdd.federated.flower.app import app_hash, write_app
from patchsvdd.federated.flower.records import RecordError
from patchsvdd.federated.manifest import ExperimentManifest
from patchsvdd.federated.progress import VALIDATION, MetricLog, SaveWhenImproved
from patchsvdd.federated.rounds import tagged
from patchsvdd.federated.site_model import expected_weights
from patchsvdd.settings import ExperimentSettings

ACQUIRE = "/flwr.proto.Runtime/AcquireTask"
GOOD = "good"
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # terminal colours, which Flower's CLI prints under Jupyter
server_app = ServerApp()  # the app's declared ServerApp: FlowerEngine plays it; no SuperLink may run it


@server_app.main()
def _refuse_to_run_here(grid: Grid, context: Context) -> None:
    raise RuntimeError(
        "this project's ServerApp runs in the data scientist's process (FlowerEngine): start the SuperLink with "
        "--isolation process (director_folder/start_superlink.sh), which then runs no app code"
    )


class FederationError(RuntimeError):
    """The federation cannot go on: a site refused or failed, or none answered in time; the message says which."""


@dataclass(frozen=True)
class SuperLink:
    """How to reach a SuperLink: ``address`` HOST:PORT, its CA certificate (None: ``insecure``, loopback
    tests only) and the file with its SuperExec secret (what lets this process take the run's ServerApp
    task)."""

    address: str
    secret_file: Path
    root_certificates: Path | None = None
    insecure: bool = False
    client_certificate: tuple[Path, Path] | None = None  # (certificate, key) this side shows: mutual TLS

    def show_certificate(self) -> None:
        """Make this process's connections show ``client_certificate`` (mutual TLS), where there is one."""
        if self.client_certificate is not None:
            mtls.present_client_certificate(*self.client_certificate)

    def certificates(self) -> bytes | None:
        """The root certificates a channel to the SuperLink trusts (None: no TLS); shows this side's own first."""
        self.show_certificate()
        return None if self.root_certificates is None else Path(self.root_certificates).read_bytes()

    def flwr(self) -> list[str]:
        """Flower's command line, showing this side's certificate where there is one."""
        if self.client_certificate is None:
            return [str(Path(sys.executable).with_name("flwr"))]
        cert, key = self.client_certificate
        return [sys.executable, "-m", "patchsvdd.federated.flower.mtls", "flwr", str(cert), str(key), "--"]

    def cli_config(self, home: Path) -> Path:
        """Write a Flower CLI home (``FLWR_HOME``) naming this SuperLink as the connection 'patchsvdd'."""
        home.mkdir(parents=True, exist_ok=True)
        lines = ["[superlink]", 'default = "patchsvdd"', "", "[superlink.patchsvdd]", f'address = "{self.address}"']
        if self.insecure:
            lines.append("insecure = true")
        elif self.root_certificates is not None:
            lines.append(f'root-certificates = "{Path(self.root_certificates).resolve()}"')
        (home / "config.toml").write_text("\n".join(lines) + "\n")
        return home


def submit_app(superlink: SuperLink, workdir: Path, timeout: float = 120.0, app: Path | None = None) -> int:
    """Submit a run of the project's app (or of the app in folder ``app``) with ``flwr run``; its run id."""
    app = write_app(workdir / "app") if app is None else app
    env = {**os.environ, "FLWR_HOME": str(superlink.cli_config(workdir / "flwr_home")), "NO_COLOR": "1"}
    superlink.show_certificate()  # checks the certificate this side shows, before Flower's command line starts
    command = [*superlink.flwr(), "run", str(app), "patchsvdd", "--format", "json"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    try:
        said = ANSI.sub("", done.stdout + "\n" + done.stderr)  # its answer, with lines and colours around it
        start = re.search(r'\{\s*"success"', said)
        answer, _ = json.JSONDecoder().raw_decode(said[start.start() if start else 0 :])
        return int(answer["run-id"])
    except (ValueError, KeyError) as exc:
        raise FederationError(
            f"flwr run did not start a run at {superlink.address}: {(done.stdout + done.stderr).strip()[-600:]}"
        ) from exc


def acquire_server_task(superlink: SuperLink, run_id: int, timeout: float = 60.0, poll: float = 0.05) -> str:
    """The token of run ``run_id``'s ServerApp task, taken from the SuperLink with its SuperExec secret."""
    client = RuntimeHttpClient.from_server_address(
        server_address=superlink.address,
        insecure=superlink.insecure,
        root_certificates=superlink.certificates(),
        interceptors=[
            RuntimeVersionHttpInterceptor(component_name="SuperExec"),
            SuperExecAuthHttpInterceptor(
                master_secret=Path(superlink.secret_file).read_bytes(), protected_methods=frozenset({ACQUIRE})
            ),
        ],
        retry_invoker=make_simple_http_retry_invoker(),
    )
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            answer = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.SERVER_APP]))
            if answer.HasField("task") and answer.token:
                if answer.task.run_id == run_id:
                    return str(answer.token)
                _abandon(superlink, str(answer.token), f"not the run this session submitted ({run_id})")
            time.sleep(poll)
    finally:
        client.close()
    raise FederationError(f"the SuperLink at {superlink.address} handed out no ServerApp task for run {run_id}")


def _abandon(superlink: SuperLink, token: str, why: str) -> None:
    grid = HttpGrid(
        runtime_api_address=superlink.address,
        insecure=superlink.insecure,
        root_certificates=superlink.certificates(),
        token=token,
    )
    grid._runtime_client.PullTaskInput(PullTaskInputRequest())
    grid._runtime_client.PushTaskOutput(PushTaskOutputRequest(sub_status=SubStatus.FAILED, details=why))
    grid.close()


def fedavg(arrays: list[dict[str, np.ndarray]], weights: list[int]) -> dict[str, np.ndarray]:
    """The weighted mean of the sites' weights, float32, computed as OpenFL's FedAvg computes it
    (``numpy.average`` of the stacked float32 arrays with the counts as weights, in float64): both engines
    give the same numbers, bit for bit, from the same sites' weights."""
    return {
        key: np.average(np.stack([site[key] for site in arrays]), weights=weights, axis=0).astype(np.float32)
        for key in arrays[0]
    }


@dataclass
class FlowerEngine:
    """A Flower run of the project's app, whose ServerApp role this process plays (see the module)."""

    superlink: SuperLink
    grid: HttpGrid
    run_id: int
    heartbeat: HeartbeatSender
    context: Any
    fab_hash: str
    poll: float = 0.05
    names: dict[int, str] = field(default_factory=dict)  # node id -> site name
    described: dict[int, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def connect(cls, superlink: SuperLink, workdir: Path, timeout: float = 120.0) -> FlowerEngine:
        """Submit a run of the app and take its ServerApp task."""
        engine = cls.take(superlink, submit_app(superlink, Path(workdir), timeout), timeout)
        if engine.fab_hash != app_hash():
            engine.close(failed="not this project's app")
            raise FederationError(f"run {engine.run_id}'s app is {engine.fab_hash[:12]}..., not {app_hash()[:12]}...")
        return engine

    @classmethod
    def take(cls, superlink: SuperLink, run_id: int, timeout: float = 120.0) -> FlowerEngine:
        """Take run ``run_id``'s ServerApp task (whatever its app) and play it."""
        grid = HttpGrid(
            runtime_api_address=superlink.address,
            insecure=superlink.insecure,
            root_certificates=superlink.certificates(),
            token=acquire_server_task(superlink, run_id, timeout),
        )
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(grid._runtime_client))
        heartbeat.start()
        task = grid._runtime_client.PullTaskInput(PullTaskInputRequest())
        TaskIdentity.task_id, TaskIdentity.run_id = task.task_id, task.run.run_id
        TaskIdentity.node_id = task.context.node_id
        run, fab = run_from_proto(task.run), fab_from_proto(task.fab)
        grid.set_run(run)
        return cls(superlink, grid, run_id, heartbeat, context_from_proto(task.context), fab.hash_str)

    @classmethod
    def open(
        cls,
        *,
        host: str,
        port: int,
        tls: bool,
        ca: str | None,
        cert: str | None,
        key: str | None,
        secret: str | None,
        workdir: Path,
        **_: Any,
    ) -> FlowerEngine:
        """``experiment.connect``'s way in: the SuperLink at ``host:port`` (mutual TLS when ``tls``: the
        SuperLink checked against ``ca``, this side showing ``cert``/``key``), its SuperExec ``secret`` file."""
        if not secret:
            raise FederationError("Flower needs the SuperLink's SuperExec secret file (superexec_secret)")
        if tls and not (ca and cert and key):
            raise FederationError("Flower with TLS needs cert_chain, api_cert and api_private_key (mutual TLS)")
        shown = (Path(cert), Path(key)) if tls and cert and key else None
        link = SuperLink(f"{host}:{port}", Path(secret), Path(ca) if tls and ca else None, not tls, shown)
        return cls.connect(link, workdir)

    def close(self, failed: str | None = None) -> None:
        """End the run (failed with the reason ``failed``, else completed)."""
        status = SubStatus.FAILED if failed else SubStatus.COMPLETED
        try:
            self.grid._runtime_client.PushTaskOutput(
                PushTaskOutputRequest(context=context_to_proto(self.context), sub_status=status, details=failed or "")
            )
        finally:
            self.heartbeat.stop()
            self.grid.close()

    # --- sending and receiving ---------------------------------------------------------------------------------

    def collect(
        self, messages: list[Message], timeout: float, until_refused: bool = False
    ) -> tuple[list[Message], list[str]]:
        """Send ``messages`` and wait for their replies (each site's refusal among them) until ``timeout``
        seconds pass without one (or, ``until_refused``, the first refusal); the replies, and a sentence for
        each refusal or missing reply."""
        ids = dict(zip(self.grid.push_messages(messages), (m.metadata.dst_node_id for m in messages)))
        replies: list[Message] = []
        problems: list[str] = []
        last = time.monotonic()
        while ids:
            for reply in self.grid.pull_messages(list(ids)):
                node = ids.pop(reply.metadata.reply_to_message_id)
                replies.append(reply)
                if reply.has_error():
                    problems.append(f"{self.names.get(node, node)}: {reply.error.reason}")
                last = time.monotonic()
            if problems and until_refused:
                break
            if ids and time.monotonic() - last > timeout:
                waiting = ", ".join(str(self.names.get(n, n)) for n in ids.values())
                problems.append(f"no answer from {waiting} in {timeout:.0f} s")
                break
            if ids:
                time.sleep(self.poll)
        return replies, problems

    def exchange(self, messages: dict[int, Message], timeout: float) -> dict[int, RecordDict]:
        """Send one message per node and wait for every reply; FederationError on a refusal or after
        ``timeout`` seconds without a reply."""
        replies, problems = self.collect(list(messages.values()), timeout, until_refused=True)
        if problems:
            raise FederationError(problems[0])
        return {reply.metadata.src_node_id: reply.content for reply in replies}

    def secure_round(
        self, task: ConfigRecord, weights: dict[str, np.ndarray], nodes: list[int], timeout: float
    ) -> tuple[dict[int, RecordDict], dict[str, np.ndarray]]:
        """A training round through SecAgg+ (``secagg.secure_round``): each site's metrics, and the mean."""
        sizes = {node: int(self.described[node]["train_size"]) for node in nodes}
        try:
            return secagg.secure_round(self.collect, self.run_id, task, weights, sizes, timeout)
        except RecordError as exc:
            raise FederationError(str(exc)) from exc

    def message(self, node: int, content: RecordDict, message_type: str) -> Message:
        return Message(content=content, dst_node_id=node, message_type=message_type)

    # --- what experiment.Engine asks -------------------------------------------------------------------------

    def sites(self, expected: int, timeout: float = 120.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        nodes = sorted(self.grid.get_node_ids())
        while len(nodes) < expected:
            if time.monotonic() > deadline:
                raise FederationError(f"{len(nodes)} SuperNodes connected after {timeout:.0f} s; expected {expected}")
            time.sleep(0.2)
            nodes = sorted(self.grid.get_node_ids())
        query = {
            n: self.message(n, RecordDict({"ask": ConfigRecord({"what": "site"})}), "query.describe") for n in nodes
        }
        for node, content in self.exchange(query, timeout).items():
            site = dict(content.config_records[records.SITE])
            self.names[node], self.described[node] = str(site["envoy"]), site
        return sorted((self.row(node) for node in nodes), key=lambda row: row["envoy"])

    def row(self, node: int) -> dict[str, Any]:
        site = self.described[node]
        description = (
            f"MVTec AD '{site['category']}': {site['train_size']} training and {site['test_size']} test images "
            f"({site['defective']} defective); defect types {site['defect_types'] or 'none'}"
        )
        shape = str(site["image_shape"]).split(",")
        return {"envoy": site["envoy"], "online": True, "description": description, "sample_shape": shape}

    def defect_types(self) -> list[str] | None:
        types = {t for site in self.described.values() for t in str(site["defect_types"]).split(",") if t}
        return [GOOD, *sorted(types - {GOOD})]

    def bundle_folders(self) -> dict[str, str | None]:
        return {str(site["envoy"]): str(site["bundle_folder"]) for site in self.described.values()}

    def start(self, model: nn.Module, manifest: ExperimentManifest, name: str, workdir: Path) -> FlowerRun:
        if not self.described:
            raise FederationError("no site described yet: call sites() first")
        return FlowerRun(self, manifest, name, tagged(model).cpu())

    def attach(self, name: str, model: nn.Module, workdir: Path) -> FlowerRun:
        raise FederationError("a Flower experiment lives in the process that started it; start it again")


def weighted(values: Iterable[tuple[float, int]]) -> float:
    """The mean of values weighted by counts (NaN values left out, NaN when none is left)."""
    pairs = [(v, w) for v, w in values if not math.isnan(v)]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else math.nan


@dataclass
class FlowerRun:
    """One experiment (a manifest) through the engine's grid."""

    engine: FlowerEngine
    manifest: ExperimentManifest
    name: str
    model: nn.Module  # the model the current round starts with (round-tagged), on the CPU
    validated: nn.Module | None = None  # the model the last round validated (what the director holds as "last")

    def aggregated_model(self) -> nn.Module:
        """The model the latest round validated (round-tagged): round r's metrics are about it, as OpenFL's."""
        return self.model if self.validated is None else self.validated

    def follow(
        self,
        on_metric: Callable[[dict[str, Any]], None] | None,
        checkpointer: SaveWhenImproved | None,
        settings: ExperimentSettings,
    ) -> MetricLog:
        log = MetricLog()

        def emit(number: int, origin: str, task: str, metric: str, value: float) -> None:
            record = {
                "round": number,
                "metric_origin": origin,
                "task_name": task,
                "metric_name": metric,
                "metric_value": value,
            }
            log.records.append(record)
            if checkpointer is not None:
                checkpointer.observe(record)
            if on_metric is not None:
                on_metric(record)

        kind = {"training": "train", "evaluation": "evaluate", "export": "query.export"}[self.manifest.task]
        weight_names = list(expected_weights(self.manifest))  # the order both sides mask the weights in
        for number in range(self.manifest.training_rounds + 1):
            message_type = kind if number < self.manifest.training_rounds or kind != "train" else "evaluate"
            weights = {k: v for k, v in self.model.state_dict().items()}
            content = RecordDict(
                {
                    records.TASK: records.task_record(self.manifest, self.name, number),
                    records.ARRAYS: records.weights_record(weights),
                }
            )
            nodes = sorted(self.engine.names)
            averaged = None
            if message_type == "train" and self.manifest.settings.secure_aggregation:
                ordered = {key: weights[key] for key in weight_names}
                replies, averaged = self.engine.secure_round(
                    content[records.TASK], ordered, nodes, settings.idle_timeout
                )
            else:
                replies = self.engine.exchange(
                    {n: self.engine.message(n, content, message_type) for n in nodes}, settings.idle_timeout
                )
            sizes = {n: records.read_sizes(replies[n]) for n in nodes}
            if message_type == "train":
                trained = {n: records.read_metrics(replies[n], records.TRAIN) for n in nodes}
                self._emit_task(emit, number, records.TRAIN, trained, {n: sizes[n][0] for n in nodes})
            validated = {n: records.read_metrics(replies[n], VALIDATION) for n in nodes}
            self._emit_task(emit, number, VALIDATION, validated, {n: sizes[n][1] for n in nodes})
            self.validated = self.model
            if message_type == "train":
                if averaged is None:
                    averaged = fedavg([records.record_weights(replies[n]) for n in nodes], [sizes[n][0] for n in nodes])
                self.model = copy.deepcopy(self.model)
                self.model.load_state_dict({k: torch.from_numpy(v) for k, v in averaged.items()})
        if checkpointer is not None:
            checkpointer.finish()
        return log

    def _emit_task(
        self,
        emit: Callable[[int, str, str, str, float], None],
        number: int,
        task: str,
        values: dict[int, dict[str, float]],
        weights: dict[int, int],
    ) -> None:
        """Each site's values of ``task``, then their means weighted by ``weights`` as 'aggregator'."""
        names = sorted({metric for site in values.values() for metric in site})
        for node, site in values.items():
            for metric in names:
                emit(number, self.engine.names[node], task, metric, site.get(metric, math.nan))
        for metric in names:
            emit(
                number,
                "aggregator",
                task,
                metric,
                weighted((values[n].get(metric, math.nan), weights[n]) for n in values),
            )
