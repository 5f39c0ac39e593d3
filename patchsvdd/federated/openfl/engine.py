"""OpenFL 1.7.1 as an engine of ``patchsvdd.experiment``: the director's sites, runs of manifests, their metrics.

A thin adapter over ``client`` (connect, shard registry, submit, attach, fetch) and ``monitor`` (the metric
stream and when to give up); the life cycle itself is engine-neutral (``patchsvdd.experiment``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openfl.interface.interactive_api.experiment import FLExperiment
from openfl.interface.interactive_api.federation import Federation
from torch import nn

from patchsvdd.errors import SettingsError
from patchsvdd.federated.manifest import ExperimentManifest
from patchsvdd.federated.openfl import client
from patchsvdd.federated.openfl.monitor import follow_metrics
from patchsvdd.federated.progress import MetricLog, SaveWhenImproved
from patchsvdd.settings import ExperimentSettings


@dataclass
class OpenFLRun:
    """One experiment on the director."""

    experiment: FLExperiment
    registry_poll: float

    def follow(self, on_metric: Any, checkpointer: SaveWhenImproved | None, settings: ExperimentSettings) -> MetricLog:
        return follow_metrics(
            self.experiment,
            idle_timeout=settings.idle_timeout,
            on_metric=on_metric,
            checkpointer=checkpointer,
            registry_poll=self.registry_poll,
            offline_grace=settings.offline_grace,
        )

    def aggregated_model(self) -> nn.Module:
        return self.experiment.get_last_model()


@dataclass
class OpenFLEngine:
    """A director (``client.connect``'s federation) as an engine; ``registry_poll``: seconds between looks at
    the shard registry while no metric arrives."""

    federation: Federation
    registry_poll: float = 5.0

    @classmethod
    def connect(cls, host: str, port: int, registry_poll: float = 5.0, **tls: Any) -> OpenFLEngine:
        """The director at ``host:port``; ``tls``: ``client.connect``'s keywords (tls, cert_chain, ...)."""
        return cls(client.connect(host, port, **tls), registry_poll)

    @classmethod
    def open(cls, *, host: str, port: int, tls: bool, ca: str | None, cert: str | None, key: str | None, **_: Any):
        """``experiment.connect``'s way in: the director at ``host:port``, mutual TLS with ``ca``, ``cert``,
        ``key`` when ``tls``."""
        return cls.connect(host, port, tls=tls, cert_chain=ca, api_cert=cert, api_private_key=key)

    def close(self) -> None:
        """Nothing to end: each experiment ends on the director by itself."""

    def sites(self, expected: int, timeout: float = 120.0) -> list[dict[str, Any]]:
        return client.wait_for_envoys(self.federation, expected, timeout=timeout)

    def defect_types(self) -> list[str] | None:
        return client.shard_defect_types(self.federation)

    def bundle_folders(self) -> dict[str, str | None]:
        return client.shard_bundle_folders(self.federation)

    def start(self, model: nn.Module, manifest: ExperimentManifest, name: str, workdir: Path) -> OpenFLRun:
        if manifest.settings.secure_aggregation:
            raise SettingsError(
                "secure_aggregation=True: OpenFL 1.7.1 has no secure aggregation; run the experiment on Flower "
                "(engine_name='flower', docs/flower.md) or set it False"
            )
        return OpenFLRun(client.submit(self.federation, name, model, manifest, workdir), self.registry_poll)

    def attach(self, name: str, model: nn.Module, workdir: Path) -> OpenFLRun:
        return OpenFLRun(client.attach(self.federation, name, model, workdir), self.registry_poll)
