"""A site's link cut mid-round, with real processes: envoy_2 in a network namespace of its own, joined to the
director's by a veth pair on a /24 of 198.18.0.0/15 (no route out), the link taken down with ``ip link``.

OpenFL 1.7.1 rides out a cut of 30 s: the director lists the envoy offline, then online again; its
collaborator reconnects to the aggregator and delivers its round; the experiment finishes. The notebook
waits ``offline_grace`` seconds for it, saying so, and gives up with the offline sentence after that.
Needs root and iproute2; skipped elsewhere.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from patchsvdd import federated as fed
from patchsvdd.models.patchsvdd.network import PatchSVDD
from patchsvdd.system.harness import (
    Processes,
    SiteLink,
    can_make_namespaces,
    log_contains,
    start_split_federation,
    wait_for,
)
from patchsvdd.system.probes import free_port

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not can_make_namespaces(), reason="needs root and ip netns (iproute2)"),
]
SETTINGS = fed.ExperimentSettings(
    rounds=2,
    repeat=200,
    max_steps=60,
    batch_size=8,
    emb_dim=8,
    round_search="fast",
    final_search="fast",
    idle_timeout=600,
)


@pytest.fixture(scope="module")
def split_federation(fed_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """Director and envoy_1 here, envoy_2 behind the link; everyone reaches the director at the link's address."""
    # a name and subnet of this run's own: two runs on one machine must not take down each other's link
    with SiteLink(f"psc{os.getpid() % 100000}", index=10 + os.getpid() % 240) as link, Processes() as processes:
        nodes = start_split_federation(tmp_path_factory.mktemp("link"), fed_data, "fabric", link, processes)
        director = next(node for node in processes.nodes if node.name == "director")
        yield link, nodes.port, director


def own_port(settings: fed.ExperimentSettings) -> fed.ExperimentSettings:
    """``settings`` with an aggregator port of this run's own (the default 50051 may be another run's)."""
    return replace(settings, aggregator_port=free_port())


def cut_during_round_0(link: SiteLink, director_log: Path, seconds: float, done: list[float]) -> threading.Thread:
    def cut() -> None:
        wait_for(
            lambda: log_contains(director_log, "Sending tasks to collaborator envoy_2 for round 0"),
            300,
            "envoy_2's first task",
        )
        time.sleep(2)
        link.cut()
        try:
            time.sleep(seconds)
        finally:
            link.restore()
            done.append(time.monotonic())

    thread = threading.Thread(target=cut, daemon=True)
    thread.start()
    return thread


def test_a_30_s_link_cut_mid_round_is_waited_for_and_the_experiment_finishes(split_federation, tmp_path: Path) -> None:
    link, port, director = split_federation
    client = fed.connect(link.host_address, port)
    torch.manual_seed(0)
    experiment = fed.start_experiment(client, PatchSVDD(emb_dim=8), own_port(SETTINGS), "cut-30", tmp_path / "nb")
    said: list[str] = []
    restored: list[float] = []
    cutter = cut_during_round_0(link, director.log, 30, restored)
    log = fed.follow_metrics(
        experiment, idle_timeout=600, registry_poll=1.0, offline_grace=SETTINGS.offline_grace, say=said.append
    )
    cutter.join(timeout=60)
    assert restored, "the link was never cut: the experiment ended first"
    assert any("envoy envoy_2 is offline; waiting up to 180 s" in line for line in said), said
    assert any("envoy envoy_2 is back online after" in line for line in said), said
    rounds = {r["round"] for r in log.records if r["task_name"] == "aggregated_model_validate"}
    assert rounds == set(range(SETTINGS.rounds + 1))  # every round, the final validation too, from both sites
    assert set(log.final()) == {"aggregator", "envoy_1", "envoy_2"}


def test_a_cut_longer_than_the_grace_gives_up_with_the_offline_sentence(split_federation, tmp_path: Path) -> None:
    link, port, director = split_federation
    client = fed.connect(link.host_address, port)
    wait_for(lambda: fed.online_envoys(client) == {"envoy_1", "envoy_2"}, 60, "both envoys online again")
    experiment = fed.start_experiment(client, PatchSVDD(emb_dim=8), own_port(SETTINGS), "cut-long", tmp_path / "nb")
    restored: list[float] = []
    cutter = cut_during_round_0(link, director.log, 45, restored)
    with pytest.raises(
        fed.FederationError, match="envoy envoy_2 went offline during the experiment for more than 10 s"
    ):
        fed.follow_metrics(experiment, idle_timeout=600, registry_poll=1.0, offline_grace=10, say=lambda line: None)
    assert not restored  # it gave up while the link was still down, after the grace and not the idle timeout
    cutter.join(timeout=90)
