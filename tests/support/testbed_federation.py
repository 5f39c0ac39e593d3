"""A federation on test hosts of their own (``testbed``): the director and each envoy on a network namespace,
started through the project's start scripts; the notebook's side run on a host of its own (``headless``);
a link cut while a round runs. For tests/test_real_network.py and the WAN and link-cut benchmarks."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patchsvdd.federated.local import (
    HarnessError,
    Node,
    Processes,
    log_contains,
    project_root,
    wait_for,
    write_envoy_config,
)
from patchsvdd.federated.openfl.local import write_director_config
from support.testbed import Testbed

HEADLESS = Path(__file__).with_name("headless.py")
# A short experiment for test hosts (tests/test_real_network.py, benchmarks/bench_link_cut.py): 2 rounds of 60
# steps at batch 8 of a D=8 model, fast search: about a minute, long enough to cut a link in the middle of a round.
TESTBED_EXPERIMENT: dict[str, Any] = {
    "rounds": 2,
    "repeat": 200,
    "max_steps": 60,
    "batch_size": 8,
    "model_options": {"emb_dim": 8},
    "round_search": "fast",
    "final_search": "fast",
}


@dataclass
class TestbedFederation:
    """A director and envoys each on a testbed host of its own (``director``, ``sites``: host names), the
    director's ``port``, the notebook's TLS parameters (``tls``; paths under ``certs``, or none), the logs."""

    bed: Testbed
    director: str
    sites: dict[str, str]
    port: int
    nodes: dict[str, Node]
    tls: dict[str, Any] = field(default_factory=dict)


def start_testbed_federation(
    run_dir: Path,
    data_root: Path,
    category: str,
    bed: Testbed,
    processes: Processes,
    director: str,
    sites: dict[str, str],
    certs: Path | None = None,
    port: int = 50050,
    timeout: float = 180.0,
) -> TestbedFederation:
    """The director on host ``director`` listening on its name, one envoy per entry of ``sites`` (envoy name ->
    host, shards 1..n of the category), each reaching the director by its name, all through the start
    scripts; with ``certs`` (written by ``patchsvdd certs``) every connection is mutual TLS. Returns once the
    director has accepted every envoy's shard (its log says so)."""
    root = project_root()
    config = write_director_config(root, run_dir / "director" / "director_config.yaml", port, host=director)
    tls_args = [str(certs)] if certs else []
    nodes = {
        "director": processes.start(
            "director",
            bed.command(director, [str(root / "director_folder" / "start_director.sh"), str(config), *tls_args]),
            run_dir / "logs" / "director.log",
            env={"PATCHSVDD_WORKDIR": str(run_dir / "director")},
        )
    }
    wait_for(
        lambda: log_contains(nodes["director"].log, "Starting director server"),
        60,
        "the director to listen",
        [nodes["director"]],
    )
    for rank, (name, host) in enumerate(sites.items(), start=1):
        shard = write_envoy_config(root, run_dir / "envoys" / f"{name}.yaml", data_root, category, rank, len(sites))
        script = [str(root / "envoy_folder" / "start_envoy.sh"), name, str(shard), director, str(port), *tls_args]
        nodes[name] = processes.start(
            name,
            bed.command(host, script),
            run_dir / "logs" / f"{name}.log",
            env={"PATCHSVDD_WORKDIR": str(run_dir / "envoys" / name), "OMP_NUM_THREADS": "1"},
        )
    wait_for(
        lambda: all(log_contains(nodes["director"].log, f"accepted shard for {name}") for name in sites),
        timeout,
        "the director to accept every envoy's shard",
        list(nodes.values()),
        poll=1.0,
    )
    tls = {}
    if certs:
        tls = {
            "tls": True,
            "cert_chain": str(certs / "root_ca.crt"),
            "api_cert": str(certs / "frontend.crt"),
            "api_private_key": str(certs / "frontend.key"),
        }
    return TestbedFederation(bed, director, dict(sites), port, nodes, tls)


@dataclass(frozen=True)
class HeadlessRun:
    """What the notebook's side printed on its host: its ``lines``, its final ``result`` (the ``RESULT`` json:
    ``status`` finished / gave_up / no_director, ...), its exit ``returncode`` and its wall ``seconds``."""

    lines: list[str]
    result: dict[str, Any]
    returncode: int
    seconds: float


def run_headless(
    federation: TestbedFederation,
    host: str,
    name: str,
    settings: dict[str, Any],
    workdir: Path,
    timeout: float = 900.0,
) -> HeadlessRun:
    """Run one experiment ``name`` from testbed host ``host`` with the notebook's own code
    (``tests/support/headless.py``), ``settings`` the ``ExperimentSettings`` fields; bounded by
    ``timeout`` seconds. Raises ``HarnessError`` (with its output) when it printed no result."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec = {
        "host": federation.director,
        "port": federation.port,
        "tls": federation.tls,
        "envoys": list(federation.sites),
        "name": name,
        "settings": settings,
        "workdir": str(workdir / "notebook"),
    }
    (workdir / "spec.json").write_text(json.dumps(spec))
    command = federation.bed.command(host, [sys.executable, str(HEADLESS), str(workdir / "spec.json")])
    start = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=workdir)
    seconds = time.monotonic() - start
    lines = done.stdout.splitlines()
    results = [json.loads(line.removeprefix("RESULT ")) for line in lines if line.startswith("RESULT ")]
    if not results:
        raise HarnessError(
            f"the notebook's side on {host} printed no result (exit {done.returncode}):\n"
            f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        )
    return HeadlessRun(lines, results[-1], done.returncode, seconds)


def log_count(path: Path, text: str) -> int:
    """How many times the log at ``path`` says ``text`` (0 while it does not exist)."""
    try:
        return path.read_text(errors="replace").count(text)
    except FileNotFoundError:
        return 0


def cut_link_when(
    federation: TestbedFederation,
    host: str,
    log_text: str,
    seconds: float,
    delay: float = 2.0,
    timeout: float = 300.0,
) -> tuple[threading.Thread, list[float]]:
    """In a thread: once the director's log says ``log_text`` anew (one time more than it has so far: the log
    outlives each test's experiment), wait ``delay`` s, take ``host``'s link down for ``seconds``, bring it up
    again. Returns the thread and a list that gets the (monotonic) time the link came back; empty while it is
    down or if ``log_text`` never came within ``timeout``."""
    restored: list[float] = []
    director_log = federation.nodes["director"].log
    said_before = log_count(director_log, log_text)

    def cut() -> None:
        wait_for(lambda: log_count(director_log, log_text) > said_before, timeout, repr(log_text))
        time.sleep(delay)
        federation.bed.cut(host)
        try:
            time.sleep(seconds)
        finally:
            federation.bed.restore(host)
            restored.append(time.monotonic())

    thread = threading.Thread(target=cut, daemon=True)
    thread.start()
    return thread, restored
