"""A site trusts nothing it is sent, with real processes: a hostile client that speaks OpenFL's protocol itself
(``tests/hostile_client.py``, run as a script) is refused with a sentence; nothing is deleted, written or run
at the director or a site; no process dies; the envoys stay registered; the project's own experiment runs.

The project's director refuses at submission. The envoys are also tested behind OpenFL's own director, which
passes every experiment on (``passing_director.py``, as a compromised director would): a site trusts no
director for this. The
canaries sit where OpenFL's own code would delete them for the name ``x/../../canary``: ``run/canary`` from
the director's working folder ``run/director``, ``run/envoys/canary`` from an envoy's ``run/envoys/envoy_N``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from patchsvdd import federated as fed
from patchsvdd.federated.local import Processes, log_contains, wait_for
from patchsvdd.federated.openfl.local import LocalFederation, start_federation
from patchsvdd.models.patchsvdd.network import PatchSVDD
from patchsvdd.system.probes import free_port, listens

pytestmark = pytest.mark.slow
HOSTILE = Path(__file__).with_name("hostile_client.py")
TRAVERSAL = "x/../../canary"
TINY = fed.ExperimentSettings(
    rounds=1,
    repeat=1,
    max_steps=1,
    batch_size=4,
    model_options={"emb_dim": 8},
    round_search="fast",
    final_search="fast",
    idle_timeout=300,
    aggregator_port=free_port(),
)
# attack -> the start of the reason the director and every envoy give
REASONS = {
    "traversal": f"its experiment name {TRAVERSAL!r} is not a plain name",
    "state_path": "its plan sets aggregator.settings.best_state_path to '/",
    "client_auth": "its plan sets network.settings.require_client_auth to False",
    "exit": "its archive carries a pickle 'model_obj.pkl', which this project's experiments never send",
    "loader": "its archive is broken or larger than",  # OpenFL's own archive: pickles, a model, a pip freeze
    "template": "its plan sets 'collaborator.settings.filename', which this project's plan has not",
    "requirements": "it asks to install 2 package(s)",
    "batch": "its settings ask batch_size=10000000, more than a site runs",
    "weights": "its initial model's weights for",
}
AT_SITES = ("traversal", "state_path", "exit", "template", "requirements")  # also tried behind OpenFL's director


def plant_canaries(run: Path) -> list[Path]:
    """A file in each folder a traversing name would delete, and one that a colliding name would meet."""
    canaries = []
    for folder in (run / "canary", run / "envoys" / "canary", run / "director" / "canary"):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "keep.txt").write_text("the site's own")
        canaries.append(folder / "keep.txt")
    return canaries


def federation(run: Path, data: Path, processes: Processes, **kwargs) -> tuple[LocalFederation, list[Path]]:
    canaries = plant_canaries(run)
    return start_federation(run, data, "fabric", n_envoys=2, processes=processes, **kwargs), canaries


@pytest.fixture(scope="module")
def guarded(fed_data: Path, tmp_path_factory: pytest.TempPathFactory):
    with Processes() as processes:
        yield federation(tmp_path_factory.mktemp("guarded") / "run", fed_data, processes)


@pytest.fixture(scope="module")
def behind_openfl(fed_data: Path, tmp_path_factory: pytest.TempPathFactory):
    with Processes() as processes:
        passing = [sys.executable, str(Path(__file__).with_name("passing_director.py"))]
        yield federation(tmp_path_factory.mktemp("openfl") / "run", fed_data, processes, director_command=passing)


def attack(nodes: LocalFederation, kind: str, marker: Path, name: str, times: int = 1) -> str:
    """The director's answer to the attack: 'refused: <reason>' or the experiment's final status."""
    out = subprocess.run(
        [sys.executable, str(HOSTILE), kind, str(marker), nodes.host, str(nodes.port), name, str(times)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["status"]


def node_log(nodes: LocalFederation, name: str) -> Path:
    return next(node.log for node in nodes.processes.nodes if node.name == name)


def all_standing(nodes: LocalFederation, canaries: list[Path], marker: Path) -> None:
    """Nothing deleted or written, every process alive, both envoys registered."""
    assert all(canary.read_text() == "the site's own" for canary in canaries)
    assert not marker.exists() and not marker.with_suffix(".npy").exists()
    assert all(node.process.poll() is None for node in nodes.processes.nodes)
    assert listens(nodes.host, nodes.port, timeout=2.0)
    assert fed.online_envoys(fed.connect(nodes.host, nodes.port)) == set(nodes.envoys)


@pytest.mark.parametrize("kind", list(REASONS))
def test_the_director_refuses_each_attack_with_a_sentence(guarded, tmp_path: Path, kind: str) -> None:
    nodes, canaries = guarded
    marker = tmp_path / "marker"
    name = TRAVERSAL if kind == "traversal" else f"attack-{kind}"
    answer = attack(nodes, kind, marker, name, times=2 if kind == "traversal" else 1)
    assert answer.startswith(f"refused: the director refused the experiment: {REASONS[kind]}"), answer
    assert log_contains(node_log(nodes, "director"), f"from intruder: {REASONS[kind]}")
    all_standing(nodes, canaries, marker)
    assert not any(log_contains(node_log(nodes, envoy), name) for envoy in nodes.envoys)  # no envoy heard of it


def test_the_projects_experiment_runs_after_the_refusals_and_meets_no_folder(guarded, tmp_path: Path) -> None:
    """Named like a folder of the director's (``canary``): it unpacks in ``experiments/``, not over that folder."""
    nodes, canaries = guarded
    client = fed.connect(nodes.host, nodes.port)
    torch.manual_seed(0)
    experiment = fed.start_experiment(client, PatchSVDD(emb_dim=8), TINY, "canary", tmp_path / "nb")
    log = fed.follow_metrics(experiment, idle_timeout=300, registry_poll=1.0)
    assert set(log.final()) == {"aggregator", *nodes.envoys}
    wait_for(lambda: fed.experiment_status(client, "canary") == "finished", 60, "the experiment's status finished")
    all_standing(nodes, canaries, tmp_path / "marker")


def test_a_refusal_reaches_the_notebook_as_a_sentence(guarded, tmp_path: Path) -> None:
    nodes, _ = guarded
    client = fed.connect(nodes.host, nodes.port)
    with pytest.raises(fed.FederationError, match="the director refused the experiment: its experiment name"):
        fed.start_experiment(client, PatchSVDD(emb_dim=8), TINY, "no spaces allowed", tmp_path / "nb")


@pytest.mark.parametrize("kind", AT_SITES)
def test_every_envoy_refuses_what_openfls_director_passes_on(behind_openfl, tmp_path: Path, kind: str) -> None:
    nodes, canaries = behind_openfl
    marker = tmp_path / "marker"
    name = TRAVERSAL if kind == "traversal" else f"site-{kind}"
    attack(nodes, kind, marker, name, times=2 if kind == "traversal" else 1)
    for envoy in nodes.envoys:
        log = node_log(nodes, envoy)
        wait_for(lambda log=log: log_contains(log, f"refused experiment {name!r}: "), 60, f"the refusal in {log.name}")
        assert log_contains(log, f"refused experiment {name!r}: {REASONS[kind]}"), log.read_text()[-3000:]
    envoy_canary = canaries[1]  # run/envoys/canary: what OpenFL's envoy would delete for the traversing name
    assert envoy_canary.read_text() == "the site's own"
    if kind == "traversal":  # the attack is real: OpenFL's own director deletes run/canary for that name
        wait_for(lambda: not canaries[0].exists(), 60, "OpenFL's director to delete run/canary")
    assert not marker.exists() and not marker.with_suffix(".npy").exists()
    assert all(node.process.poll() is None for node in nodes.processes.nodes if node.name != "director")
    assert fed.online_envoys(fed.connect(nodes.host, nodes.port)) == set(nodes.envoys)
