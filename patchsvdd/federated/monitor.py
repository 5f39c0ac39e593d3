"""Following a running experiment: the metric log, the watchdog that decides when to give up, the
stream reader, and the checkpointer that keeps the best model.

``Watchdog`` holds every give-up rule as a pure decision on (time, envoys
online, status) and is tested without a director; ``follow_metrics`` only
moves messages from OpenFL's metric stream to it.
"""

from __future__ import annotations

import math
import os
import queue
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openfl.interface.interactive_api.experiment import FLExperiment

from patchsvdd.federated.client import FederationError, experiment_status, online_envoys
from patchsvdd.federated.rounds import round_of, untagged
from patchsvdd.federated.tasks import HELDOUT_METRIC
from patchsvdd.system.probes import still_listens_after


class DirectorGoneError(FederationError):
    """The director stopped answering during an experiment; its experiments are lost with it."""


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


def failed_at_a_site(name: str) -> str:
    """The sentence for an experiment the director reports failed: a site refused it or a task raised there."""
    return (
        f"experiment {name!r} failed at a site: an envoy refused it (its site guard says why in one line of the "
        f"envoy's log: '[site guard] <envoy> refused experiment {name!r}: ...') or one of its tasks raised there "
        "(the envoy's log has the traceback; the director's log names the envoy)"
    )


@dataclass
class Watchdog:
    """When to give up on experiment ``name`` while no metric arrives; times are ``time.monotonic()`` seconds.

    ``check`` answers None (keep waiting) or the sentence to raise: the director
    reports the experiment failed (a site refused it or a task raised); an envoy of ``participants`` has been
    offline for more than ``offline_grace`` seconds (a link that drops for less is waited for: ``say`` is told
    once when an envoy goes offline and once when it is back); the experiment has waited ``pending_timeout``
    seconds behind another one; no metric for ``idle_timeout`` seconds.
    """

    name: str
    participants: set[str]
    idle_timeout: float
    pending_timeout: float
    last_progress: float
    pending_since: float | None = None
    offline_grace: float = 0.0
    say: Callable[[str], None] = field(default=lambda line: print(line, flush=True), repr=False)
    offline_since: dict[str, float] = field(default_factory=dict)

    def progress(self, now: float) -> None:
        """A metric (or the stream's end) arrived at ``now``."""
        self.last_progress = now

    def check(self, now: float, online: set[str], status: str | None) -> str | None:
        """The reason to give up at ``now``, given the envoys online and the director's status; or None."""
        if status == "failed":
            return failed_at_a_site(self.name)
        for envoy in sorted(self.participants - online - set(self.offline_since)):
            self.offline_since[envoy] = now
            if self.offline_grace > 0:
                self.say(
                    f"experiment {self.name!r}: envoy {envoy} is offline; waiting up to {self.offline_grace:.0f} s "
                    "for it to come back (offline_grace)"
                )
        for envoy in sorted(set(self.offline_since) & online):
            self.say(
                f"experiment {self.name!r}: envoy {envoy} is back online after "
                f"{now - self.offline_since.pop(envoy):.0f} s; the experiment goes on"
            )
        gone = sorted(envoy for envoy, since in self.offline_since.items() if now - since >= self.offline_grace)
        if gone:
            waited = f" for more than {self.offline_grace:.0f} s" if self.offline_grace > 0 else ""
            return (
                f"experiment {self.name!r}: envoy {', '.join(gone)} went offline during the experiment{waited}, "
                "which cannot finish without it. Restart the envoy and the director, then "
                "start a new experiment from the last checkpoint (the notebook's initial_checkpoint)."
            )
        self.pending_since = (
            (self.pending_since if self.pending_since is not None else now) if status == "pending" else None
        )
        if self.pending_since is not None and now - self.pending_since > self.pending_timeout:
            return (
                f"experiment {self.name!r} has waited {self.pending_timeout:.0f} s behind another experiment on "
                "the director, which runs one at a time and cannot stop one (OpenFL 1.7.1). If that one is stuck "
                "(an envoy died), restart the director: the envoys register again by themselves."
            )
        if now - self.last_progress > self.idle_timeout:
            return (
                f"experiment {self.name!r}: no metric for {self.idle_timeout:.0f} s although every envoy is "
                f"online (status {status}); see the director and envoy logs."
            )
        return None


class RoundLines:
    """One line per round as the metrics stream in (pass as ``follow_metrics``'s ``on_metric``): the round,
    seconds since the previous line, and each of ``keys`` aggregated with every site's value, e.g.
    ``round 2/5   41 s  heldout_pos 2.108 (envoy_1 2.102, envoy_2 2.114)  det_sum ...``.

    A round's line is written when the aggregator's values of all ``keys`` for it have arrived (OpenFL
    streams a task's aggregate after every site's value). ``rounds``: training rounds, for 'r/rounds' (the
    last, validation-only round is rounds itself). ``write`` takes each line (default: print, flushed).
    """

    def __init__(
        self,
        keys: tuple[str, ...],
        rounds: int | None = None,
        task: str = "aggregated_model_validate",
        write: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.keys, self.rounds, self.task, self.clock = keys, rounds, task, clock
        self.write = write if write is not None else (lambda line: print(line, flush=True))
        self.values: dict[int, dict[str, dict[str, float]]] = {}  # round -> key -> origin -> value
        self.written: set[int] = set()
        self.last = clock()

    def __call__(self, record: dict[str, Any]) -> None:
        if record["task_name"] != self.task or record["metric_name"] not in self.keys:
            return
        number = int(record["round"])
        by_key = self.values.setdefault(number, {})
        by_key.setdefault(record["metric_name"], {})[record["metric_origin"]] = float(record["metric_value"])
        if number not in self.written and all("aggregator" in by_key.get(key, {}) for key in self.keys):
            self.written.add(number)
            now = self.clock()
            self.write(self.line(number, now - self.last))
            self.last = now

    def line(self, number: int, seconds: float) -> str:
        """The line of round ``number`` from the values received so far."""
        of = f"/{self.rounds}" if self.rounds is not None else ""
        parts = [f"round {number}{of} {seconds:5.0f} s"]
        for key in self.keys:
            origins = self.values[number].get(key, {})
            sites = ", ".join(
                f"{origin} {value:.3f}" for origin, value in sorted(origins.items()) if origin != "aggregator"
            )
            parts.append(f"{key} {origins['aggregator']:.3f} ({sites})")
        return "  ".join(parts)


_END = object()


def _pump(call, inbox: queue.Queue) -> None:
    """Move the gRPC metric stream into ``inbox`` as dicts, then the end marker (or the error)."""
    try:
        for message in call:
            inbox.put(
                {
                    "round": int(message.round),
                    "metric_origin": message.metric_origin,
                    "task_name": message.task_name,
                    "metric_name": message.metric_name,
                    "metric_value": float(message.metric_value),
                }
            )
        inbox.put(_END)
    except Exception as exc:  # gRPC errors arrive here; re-raised by follow_metrics
        inbox.put(exc)


def follow_metrics(
    experiment: FLExperiment,
    idle_timeout: float = 900.0,
    on_metric: Callable[[dict[str, Any]], None] | None = None,
    checkpointer: SaveWhenImproved | None = None,
    registry_poll: float = 5.0,
    pending_timeout: float = 300.0,
    offline_grace: float = 0.0,
    say: Callable[[str], None] | None = None,
) -> MetricLog:
    """Collect the experiment's metrics until it ends; ``on_metric`` sees each, ``checkpointer`` saves improvements.

    While waiting, the shard registry and the experiment's status are read
    every ``registry_poll`` seconds and put to a ``Watchdog``: FederationError
    when it gives up (an envoy offline for more than ``offline_grace`` seconds, the notebook's
    ``settings.offline_grace``; it says when one goes offline and when it is back, by ``say``, default
    print) or the experiment
    ends in failure; DirectorGoneError when
    the director stops answering.
    """
    import grpc
    from openfl.protocols import director_pb2

    log = MetricLog()
    inbox: queue.Queue = queue.Queue()
    name = experiment.experiment_name
    call = experiment.federation.dir_client.stub.GetMetricStream(
        director_pb2.GetMetricStreamRequest(experiment_name=name)
    )
    threading.Thread(target=_pump, args=(call, inbox), name="metric-stream", daemon=True).start()
    said: dict[str, Any] = {} if say is None else {"say": say}
    watchdog = Watchdog(
        name,
        set(experiment.plan.authorized_cols),
        idle_timeout,
        pending_timeout,
        time.monotonic(),
        offline_grace=offline_grace,
        **said,
    )
    try:
        while True:
            try:
                item = inbox.get(timeout=min(idle_timeout, registry_poll))
            except queue.Empty:
                try:
                    online, status = (
                        online_envoys(experiment.federation),
                        experiment_status(experiment.federation, name),
                    )
                except grpc.RpcError as exc:
                    raise director_gone(experiment, checkpointer, exc) from None
                reason = watchdog.check(time.monotonic(), online, status)
                if reason is not None:
                    raise FederationError(reason) from None
                continue
            watchdog.progress(time.monotonic())
            if item is _END:
                break
            if isinstance(item, grpc.RpcError) and item.code() == grpc.StatusCode.UNAVAILABLE:
                raise director_gone(experiment, checkpointer, item) from None
            if isinstance(item, Exception):
                raise FederationError(f"experiment {name!r}: metric stream broke: {item}") from item
            log.records.append(item)
            if on_metric is not None:
                on_metric(item)
            if checkpointer is not None:
                checkpointer.observe(item)
    except BaseException:
        call.cancel()
        raise
    if checkpointer is not None:
        checkpointer.finish()
    status = experiment.get_experiment_status()
    if status is not None and str(status).lower() == "failed":
        raise FederationError(failed_at_a_site(name))
    return log


def director_gone(
    experiment: FLExperiment, checkpointer: SaveWhenImproved | None, cause: Exception
) -> DirectorGoneError:
    """The sentence for a director that stopped answering (process ended, machine or network down)."""
    federation = experiment.federation
    host, port = federation.director_node_fqdn, getattr(federation, "director_port", None)
    where = f"{host}:{port}" if port else host
    gone = port is not None and not still_listens_after(host, int(port), seconds=5.0)
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
    when the experiment ends. The director streams metrics with up to a
    second's delay, so a round r+1 shorter than that (toy test rounds, never a
    real one) can end first: the model fetched then says so by its round tag
    (``rounds.py``; OpenFL 1.7.1 itself tells no round), and it is not saved
    under round r's score: the round goes to ``missed`` with a warning, and
    the file and ``best_score`` stay those of the model saved before.
    ``fetch`` (default: the experiment's last model) is called once per save.
    ``save_checkpoint`` writes a temporary file and renames it: a crash never
    leaves a broken file.
    ``metadata`` goes into the file, with the round and the score.
    """

    def __init__(
        self,
        experiment: FLExperiment | None,
        path: str | os.PathLike,
        /,
        metric: str = HELDOUT_METRIC,
        lower_is_better: bool = True,
        fetch: Callable[[], Any] | None = None,
        **metadata: Any,
    ) -> None:
        self.path, self.metric, self.metadata = Path(path), metric, metadata
        if fetch is None and experiment is None:
            raise ValueError("SaveWhenImproved needs an experiment or a fetch function")
        self.fetch = fetch if fetch is not None else experiment.get_last_model  # type: ignore[union-attr]
        self.lower_is_better = lower_is_better
        self.best_score = math.inf if lower_is_better else -math.inf
        self.best_round: int | None = None
        self.saved_round: int | None = None  # round of the model in ``path``, once written
        self.missed: list[int] = []  # improvements whose model the director had replaced before it was fetched
        self._pending: tuple[int, float] | None = None
        self._saved_score = self.best_score

    def _better(self, score: float) -> bool:
        return not math.isnan(score) and (score < self.best_score if self.lower_is_better else score > self.best_score)

    def observe(self, record: dict[str, Any]) -> None:
        """Look at one streamed metric: save a pending improvement once a later round reports."""
        if self._pending is not None and record["round"] > self._pending[0]:
            self._save()
        key = (record["metric_origin"], record["task_name"], record["metric_name"])
        score = record["metric_value"]
        if key == ("aggregator", "aggregated_model_validate", self.metric) and self._better(score):
            self.best_score, self.best_round = score, int(record["round"])
            self._pending = (self.best_round, score)

    def finish(self) -> None:
        """The experiment ended: save the pending improvement, if any."""
        if self._pending is not None:
            self._save()

    def _save(self) -> None:
        from patchsvdd.training.checkpoint import save_checkpoint

        if self._pending is None:
            return
        round_number, score = self._pending
        self._pending = None
        model = self.fetch()
        fetched = round_of(model)
        if fetched is not None and fetched != round_number:
            self.missed.append(round_number)
            self.best_score, self.best_round = self._saved_score, self.saved_round
            warnings.warn(
                f"the model validated in round {round_number} ({self.metric} {score:.4f}) was replaced on the "
                f"director by round {fetched}'s before it could be fetched (a round shorter than the metric "
                f"stream's delay); {self.path} keeps round {self.saved_round}'s",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        save_checkpoint(
            untagged(model), self.path, round=round_number, score=float(score), metric=self.metric, **self.metadata
        )
        self.saved_round, self._saved_score = round_number, score
