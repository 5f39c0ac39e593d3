"""The federation across test hosts of their own, as on a real network: a director host, two site
hosts and a notebook host, each a network namespace with an address on 198.19.0.0/16 (in 198.18.0.0/15, no
route out) and a name every host resolves, joined by a bridge; mutual TLS with certificates for those names;
a firewall on the director's host that opens only the director's and the aggregator's ports. The
notebook's side runs on its host (``tests/support/headless.py``, the notebook's own code).

A site's link cut of 30 s in the middle of a round is ridden out: when the link is back the envoy's supervisor
restarts the envoy, which registers again, trains the round again and delivers it, and the notebook waits
``offline_grace`` seconds for the envoy, saying so. Longer than the grace, the notebook gives up with the
offline sentence. Needs root, iproute2 and nftables; skipped elsewhere.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from dataclasses import asdict, replace
from pathlib import Path

import pytest
from support import testbed
from support.testbed_federation import (
    TESTBED_EXPERIMENT,
    HeadlessRun,
    cut_link_when,
    run_headless,
    start_testbed_federation,
)

from patchsvdd import federated as fed
from patchsvdd.federated.local import Processes, log_contains, project_root, wait_for
from patchsvdd.system.certs import create_federation_certs

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not testbed.can_make_namespaces(), reason="needs root and ip netns (iproute2)"),
    pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft (Debian's nftables) for the firewall"),
]
DIRECTOR, SITE_A, SITE_B, NOTEBOOK, OTHER = (
    "director.hq.test",
    "site-a.plant-a.test",
    "site-b.plant-b.test",
    "notebook.hq.test",
    "backup.hq.test",
)
SITES = {"site-a": SITE_A, "site-b": SITE_B}
PORT, AGGREGATOR_PORT = 50050, 50051
SETTINGS = fed.ExperimentSettings(**TESTBED_EXPERIMENT, idle_timeout=600, aggregator_port=AGGREGATOR_PORT)
ROOT = project_root()


@pytest.fixture(scope="module")
def network(fed_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """The hosts, the certificates for their names, the director's firewall, and the federation running."""
    run_dir = tmp_path_factory.mktemp("network")
    certs = create_federation_certs(run_dir / "pki", [DIRECTOR], list(SITES), ["frontend"])
    with testbed.Testbed([DIRECTOR, SITE_A, SITE_B, NOTEBOOK, OTHER]) as bed, Processes() as processes:
        bed.firewall(DIRECTOR, [PORT, AGGREGATOR_PORT])
        nodes = start_testbed_federation(run_dir, fed_data, "fabric", bed, processes, DIRECTOR, SITES, certs, PORT)
        yield nodes, run_dir


def notebook(network, name: str, settings: fed.ExperimentSettings, tmp_path: Path) -> HeadlessRun:
    """Run the notebook's side on its host, the notebook's own code."""
    nodes, _ = network
    return run_headless(nodes, NOTEBOOK, name, asdict(settings), tmp_path)


def cut_during_round_0(network, seconds: float) -> tuple[threading.Thread, list[float]]:
    """Take site-b's link down two seconds after the director sent it round 0's tasks, for ``seconds``."""
    nodes, _ = network
    return cut_link_when(nodes, SITE_B, "Sending tasks to collaborator site-b for round 0", seconds)


def reaches(bed: testbed.Testbed, source: str, host: str, port: int) -> bool:
    """Whether a TCP connection from ``source`` to ``host:port`` is answered (the project's own probe)."""
    probe = [sys.executable, "-m", "patchsvdd.system.tls", "reach", host, str(port)]
    return subprocess.run(bed.command(source, probe), capture_output=True, timeout=60).returncode == 0


def test_over_tls_by_name_through_the_firewall_a_30_s_cut_mid_round_is_ridden_out(network, tmp_path: Path) -> None:
    cutter, restored = cut_during_round_0(network, 30)
    run = notebook(network, "cut-30", SETTINGS, tmp_path)
    lines, result = run.lines, run.result
    cutter.join(timeout=60)
    assert restored, "the link was never cut: the experiment ended first"
    assert (result["status"], result["rounds"], result["nodes"]) == (
        "finished",
        [0, 1, 2],
        ["aggregator", "site-a", "site-b"],
    ), lines
    assert any("envoy site-b is offline; waiting up to 180 s" in line for line in lines), lines
    assert any("envoy site-b is back online after" in line for line in lines), lines


def test_the_directors_firewall_opens_only_its_two_ports(network, tmp_path: Path) -> None:
    nodes, run_dir = network
    with Processes() as extra:  # something else listening on the director's host
        listener = extra.start(
            "listener",
            nodes.bed.command(DIRECTOR, [sys.executable, "-u", "-m", "http.server", "8000", "--bind", DIRECTOR]),
            tmp_path / "http.log",
        )
        wait_for(lambda: log_contains(listener.log, "Serving HTTP"), 30, "the extra listener", [listener])
        assert reaches(nodes.bed, DIRECTOR, DIRECTOR, 8000)  # it listens: on its own host it answers
        assert not reaches(nodes.bed, SITE_A, DIRECTOR, 8000)  # from a site the firewall drops it
    assert reaches(nodes.bed, SITE_A, DIRECTOR, PORT)


def test_a_director_certificate_for_another_name_is_refused_with_a_sentence(network, tmp_path: Path) -> None:
    """A director on backup.hq.test whose certificate names another host: the envoy stops before OpenFL."""
    nodes, run_dir = network
    certs = create_federation_certs(tmp_path / "pki", ["wrong.hq.test"], ["site-a"], ["frontend"])
    config = run_dir / "director" / "director_config.yaml"
    backup = config.read_text().replace(DIRECTOR, OTHER)
    (tmp_path / "director.yaml").write_text(backup)
    with Processes() as extra:
        director = extra.start(
            "backup",
            nodes.bed.command(
                OTHER,
                [str(ROOT / "director_folder" / "start_director.sh"), str(tmp_path / "director.yaml"), str(certs)],
            ),
            tmp_path / "backup.log",
            env={"PATCHSVDD_WORKDIR": str(tmp_path / "backup")},
        )
        wait_for(lambda: log_contains(director.log, "Starting director server"), 60, "the backup director", [director])
        shard = run_dir / "envoys" / "site-a.yaml"
        envoy = subprocess.run(
            nodes.bed.command(
                SITE_A,
                [str(ROOT / "envoy_folder" / "start_envoy.sh"), "site-a", str(shard), OTHER, str(PORT), str(certs)],
            ),
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert envoy.returncode == 2, envoy.stdout + envoy.stderr
    assert f"the director at {OTHER}:{PORT} is not trusted" in envoy.stderr, envoy.stderr
    assert f"name '{OTHER}'" in envoy.stderr


def test_a_cut_longer_than_the_grace_gives_up_with_the_offline_sentence_and_nothing_runs_on(
    network, tmp_path: Path
) -> None:
    nodes, _ = network
    cutter, restored = cut_during_round_0(network, 60)
    run = notebook(network, "cut-long", replace(SETTINGS, offline_grace=15), tmp_path)
    lines, result = run.lines, run.result
    assert result["status"] == "gave_up", lines
    assert "envoy site-b went offline during the experiment for more than 15 s" in result["reason"], result
    assert not restored, "it gave up only after the link was back: the grace did not decide"
    assert run.returncode == 0 and run.seconds < 300
    namespace = nodes.bed.hosts[NOTEBOOK].namespace
    left = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True, timeout=30).stdout
    assert left.split() == [], f"processes left on the notebook host: {left}"
    cutter.join(timeout=90)
