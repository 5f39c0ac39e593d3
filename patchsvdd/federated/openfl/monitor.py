"""Following a running OpenFL experiment: the watchdog that decides when to give up and the reader of the
director's metric stream (the metric log, the round lines and the checkpointer it feeds are engine-neutral:
``progress.py``).

``Watchdog`` holds every give-up rule as a pure decision on (time, envoys
online, status) and is tested without a director; ``follow_metrics`` only
moves messages from OpenFL's metric stream to it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from openfl.interface.interactive_api.experiment import FLExperiment

from patchsvdd.federated.openfl.client import FederationError, experiment_status, online_envoys
from patchsvdd.federated.progress import MetricLog, RoundLines, SaveWhenImproved
from patchsvdd.system.probes import still_listens_after

__all__ = ["DirectorGoneError", "MetricLog", "RoundLines", "SaveWhenImproved", "Watchdog", "follow_metrics"]


class DirectorGoneError(FederationError):
    """The director stopped answering during an experiment; its experiments are lost with it."""


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
