"""Faults with real processes: an envoy that dies in the middle of a round."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from patchsvdd import federated as fed
from patchsvdd.demo import Processes, log_contains, start_federation, wait_for
from patchsvdd.model import PatchSVDD
from patchsvdd.synth import generate_category

pytestmark = pytest.mark.slow


def test_envoy_dying_mid_round_is_reported_within_seconds(tmp_path: Path) -> None:
    generate_category(tmp_path / "data", "fabric", seed=2, n_train=4, n_test_good=2, n_test_per_defect=1, image_size=256)
    with Processes() as processes:
        nodes = start_federation(tmp_path / "run", tmp_path / "data", "fabric", n_envoys=2, processes=processes)
        client = fed.connect(nodes.host, nodes.port)
        # Long enough rounds that the envoy is surely killed while training.
        settings = fed.ExperimentSettings(rounds=2, repeat=500, max_steps=400, batch_size=4, idle_timeout=600)
        torch.manual_seed(0)
        experiment = fed.start_experiment(client, PatchSVDD(emb_dim=8), settings, "doomed", tmp_path / "nb")
        victim = next(n for n in processes.nodes if n.name == "envoy_2")
        director_log = next(n for n in processes.nodes if n.name == "director").log
        killed_at: list[float] = []

        def kill_when_training() -> None:
            wait_for(lambda: log_contains(director_log, "Sending tasks to collaborator envoy_2 for round 0"), 120,
                     "envoy_2 to get its first task")
            os.killpg(victim.process.pid, signal.SIGKILL)  # the start script, fx and all their threads
            killed_at.append(time.monotonic())

        killer = threading.Thread(target=kill_when_training)
        killer.start()
        with pytest.raises(fed.FederationError, match="envoy envoy_2 went offline during the experiment"):
            fed.follow_metrics(experiment, idle_timeout=600, registry_poll=1.0)
        killer.join(timeout=10)
        assert killed_at and time.monotonic() - killed_at[0] < 40  # heartbeat period 5 s: offline after 10 s
