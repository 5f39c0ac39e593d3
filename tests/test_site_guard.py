"""The site guard with real processes: a hostile client that uses OpenFL's API directly is refused at every
site, nothing of its code runs there, the envoys stay online, and this project's own experiments still run.

The hostile client is ``tests/hostile_client.py``, run as a script so that its code travels by value. The
envoys are tested behind a director that passes every experiment on (``review_experiments: false``, as
OpenFL's own director or a compromised one would): a site trusts no director for this. The project's
director refuses the same experiments at submission. A federation whose envoys set
``trust_client_code: true`` runs an attack: the marker appears there, so the attacks are real and the
refusals are the guard's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from patchsvdd import federated as fed
from patchsvdd.models.patchsvdd.network import PatchSVDD
from patchsvdd.system.harness import Processes, log_contains, start_federation, wait_for

pytestmark = pytest.mark.slow
HOSTILE = Path(__file__).with_name("hostile_client.py")
TINY = fed.ExperimentSettings(
    rounds=1, repeat=1, max_steps=1, batch_size=4, emb_dim=8, round_search="fast", final_search="fast", idle_timeout=300
)
ATTACKS = {
    "loader": "its data interface is code sent by the client (by value), not one of this project's classes",
    "tasks": "its tasks is code sent by the client (by value)",
    "model": "its model needs posix.system",
    "plan": "its plan builds 'logging.basicConfig' for collaborator.template",
    "requirements": "it asks to install",
}


@pytest.fixture(scope="module")
def guarded(fed_data: Path, tmp_path_factory: pytest.TempPathFactory):
    with Processes() as processes:
        yield start_federation(
            tmp_path_factory.mktemp("guarded"),
            fed_data,
            "fabric",
            n_envoys=2,
            processes=processes,
            director_config={"review_experiments": False},
        )


def attack(nodes, kind: str, marker: Path, name: str) -> dict:
    out = subprocess.run(
        [sys.executable, str(HOSTILE), kind, str(marker), nodes.host, str(nodes.port), name],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def envoy_logs(nodes) -> list[Path]:
    return [node.log for node in nodes.processes.nodes if node.name.startswith("envoy_")]


@pytest.mark.parametrize("kind", list(ATTACKS))
def test_a_hostile_client_is_refused_at_every_site_and_nothing_of_it_runs(guarded, tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "marker.npy"
    name = f"attack-{kind}"
    result = attack(guarded, kind, marker, name)
    assert result["status"] == "failed", result  # the client learns it from the director, not from a timeout
    for log in envoy_logs(guarded):
        wait_for(lambda log=log: log_contains(log, f"refused experiment '{name}': "), 30, f"the refusal in {log.name}")
        assert log_contains(log, f"refused experiment '{name}': {ATTACKS[kind]}"), log.read_text()[-3000:]
    assert not marker.exists() and not marker.with_suffix("").exists()
    client = fed.connect(guarded.host, guarded.port)
    assert fed.online_envoys(client) == set(guarded.envoys)  # registered still, and ready for the next experiment


def test_the_projects_experiments_run_after_the_refusals(guarded, tmp_path: Path) -> None:
    client = fed.connect(guarded.host, guarded.port)
    torch.manual_seed(0)
    experiment = fed.start_experiment(client, PatchSVDD(emb_dim=8), TINY, "honest", tmp_path / "nb")
    log = fed.follow_metrics(experiment, idle_timeout=300, registry_poll=1.0)
    assert set(log.final()) == {"aggregator", *guarded.envoys}
    # the director marks it finished just after the last metric is streamed: wait for that, bounded
    wait_for(lambda: fed.experiment_status(client, "honest") == "finished", 60, "the experiment's status finished")
    for envoy_log in envoy_logs(guarded):  # each refusal said once: a refused experiment is not fetched again
        text = envoy_log.read_text()
        for kind in ATTACKS:
            assert text.count(f"refused experiment 'attack-{kind}': ") <= 1, envoy_log


def test_settings_that_fail_at_the_site_reach_the_notebook_as_a_sentence(guarded, tmp_path: Path) -> None:
    """Settings are checked again where they arrive (an unpickled object skips the dataclass's checks)."""
    client = fed.connect(guarded.host, guarded.port)
    bad = replace(TINY)
    object.__setattr__(bad, "holdout_fraction", 5.0)  # what a client that bypasses ExperimentSettings can send
    experiment = fed.start_experiment(client, PatchSVDD(emb_dim=8), bad, "bad-settings", tmp_path / "nb")
    with pytest.raises(fed.FederationError, match="'bad-settings' failed at a site: an envoy refused it"):
        fed.follow_metrics(experiment, idle_timeout=600, registry_poll=1.0)  # the watchdog, not the idle timeout
    for log in envoy_logs(guarded):
        wait_for(lambda log=log: log_contains(log, "refused experiment 'bad-settings': its task "), 30, "the refusal")


def test_the_projects_director_refuses_them_at_submission(fed_data: Path, tmp_path: Path) -> None:
    """Nothing of a refused experiment runs at the director (which builds the plan's aggregator components and
    loads the assigner) and no envoy receives it; the project's own experiment is accepted and runs."""
    with Processes() as processes:
        nodes = start_federation(tmp_path / "run", fed_data, "fabric", n_envoys=1, processes=processes)
        director_log = next(node.log for node in processes.nodes if node.name == "director")
        expected = {
            "pipeline": "its plan builds 'subprocess.Popen' for compression_pipeline.template",
            "loader": ATTACKS["loader"],
        }
        for kind, reason in expected.items():
            marker = tmp_path / f"marker_{kind}.npy"
            assert attack(nodes, kind, marker, f"submitted-{kind}")["status"] == "not accepted"
            assert log_contains(
                director_log, f"the director refused experiment 'submitted-{kind}' from intruder: {reason}"
            )
            assert not marker.exists() and not marker.with_suffix("").exists()
        assert not any(log_contains(log, "submitted-") for log in envoy_logs(nodes))
        client = fed.connect(nodes.host, nodes.port)
        fed.follow_metrics(
            fed.start_experiment(client, PatchSVDD(emb_dim=8), TINY, "honest", tmp_path / "nb"),
            idle_timeout=300,
            registry_poll=1.0,
        )


def test_a_site_that_trusts_client_code_runs_it_and_says_so(fed_data: Path, tmp_path: Path) -> None:
    with Processes() as processes:
        nodes = start_federation(
            tmp_path / "run",
            fed_data,
            "fabric",
            n_envoys=1,
            processes=processes,
            envoy_config={"trust_client_code": True},
            director_config={"review_experiments": False},
        )
        (log,) = envoy_logs(nodes)
        assert log_contains(log, "[site guard] trust_client_code is on")
        marker = tmp_path / "marker"
        attack(nodes, "plan", marker, "attack-trusted")
        wait_for(marker.exists, 60, "the client's command to run at the trusting site")
        assert log_contains(log, "experiment 'attack-trusted' is not reviewed")
