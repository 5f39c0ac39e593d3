"""Start a director and envoys on this machine through the project's start scripts, and stop them (Flower's
SuperLink and sites: ``flower/local.py``, with the process helpers here).

Used by ``make demo``, the tests and the benchmarks. Every process runs in its
own session so that it can be stopped with its children; readiness is asked
of the director itself (its port, then its shard registry), polled with a
deadline, never a fixed sleep. The start scripts live in a project checkout
(``project_root``), not in the installed package.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from patchsvdd.system.probes import free_port, listens

ROOT_MARKERS = ("director_folder/start_director.sh", "envoy_folder/start_envoy.sh")


class HarnessError(RuntimeError):
    """A process did not start or get ready; the message says which and where its log is."""


def project_root(start: Path | None = None) -> Path:
    """The project checkout with the start scripts: ``$PATCHSVDD_ROOT``, else ``start`` (default: the current
    folder) or a folder above it, else the checkout this package was loaded from."""
    candidates = [Path(os.environ["PATCHSVDD_ROOT"])] if os.environ.get("PATCHSVDD_ROOT") else []
    here = Path(start or Path.cwd()).resolve()
    candidates += [here, *here.parents, Path(__file__).resolve().parents[2]]
    for folder in candidates:
        if all((folder / marker).is_file() for marker in ROOT_MARKERS):
            return folder
    raise HarnessError(
        f"no project checkout (a folder with {' and '.join(ROOT_MARKERS)}) at or above {here}: "
        "run from the checkout, or set PATCHSVDD_ROOT to it"
    )


def with_this_environment(path: str | None = None) -> str:
    """``path`` (default: $PATH) with this interpreter's bin folder first: the start scripts then find the
    ``fx`` of the environment running this code even where that environment is not activated (a checkout's
    own .venv still comes first: see scripts/common.sh)."""
    path = os.environ.get("PATH", "") if path is None else path
    return os.pathsep.join([str(Path(sys.executable).parent), *filter(None, path.split(os.pathsep))])


def tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a log, or '' when it does not exist."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


def log_contains(path: Path, text: str) -> bool:
    """Whether the log at ``path`` holds ``text`` (False while it does not exist)."""
    try:
        return text in path.read_text(errors="replace")
    except FileNotFoundError:
        return False


@dataclass
class Node:
    """A started process with its log."""

    name: str
    process: subprocess.Popen
    log: Path


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class Processes:
    """Processes started in their own sessions, so that each can be stopped with all its children."""

    nodes: list[Node] = field(default_factory=list)

    def start(
        self, name: str, command: Sequence[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> Node:
        """Run ``command`` (in ``cwd``, default the current folder) with its output in ``log``."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as handle:
            process = subprocess.Popen(
                list(command),
                stdout=handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=cwd,
                env={**os.environ, "PATH": with_this_environment(), **(env or {})},
                start_new_session=True,
            )
        node = Node(name, process, log)
        self.nodes.append(node)
        return node

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every process group, SIGKILL what is left after ``grace`` seconds."""
        for node in self.nodes:
            if node.process.poll() is None:
                _signal_group(node.process, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for node in self.nodes:
            try:
                node.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(node.process, signal.SIGKILL)
                node.process.wait(timeout=5)
        self.nodes.clear()

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_for(
    condition: Callable[[], bool], timeout: float, what: str, watch: Sequence[Node] = (), poll: float = 0.2
) -> None:
    """Poll ``condition`` until true; HarnessError when ``timeout`` passes or a watched process exits first."""
    deadline = time.monotonic() + timeout
    while not condition():
        for node in watch:
            if node.process.poll() is not None:
                raise HarnessError(
                    f"{node.name} exited (code {node.process.returncode}) while waiting for {what}; "
                    f"its log {node.log} ends with:\n{tail(node.log)}"
                )
        if time.monotonic() > deadline:
            logs = "; ".join(str(n.log) for n in watch)
            raise HarnessError(f"timed out after {timeout:.0f} s waiting for {what} (logs: {logs})")
        time.sleep(poll)


@dataclass
class LocalFederation:
    """A running director and its envoys; ``tls`` holds the notebook's TLS parameters when mutual TLS is on."""

    host: str
    port: int
    envoys: list[str]
    processes: Processes
    tls: dict[str, Any] = field(default_factory=lambda: {"tls": False})


def write_director_config(
    root: Path, path: Path, port: int, host: str = "localhost", top_level: dict[str, Any] | None = None
) -> Path:
    """A copy of the project's director_config.yaml listening on ``host:port``; ``top_level``: settings added at
    the top (e.g. ``settings`` of its own)."""
    config = yaml.safe_load((root / "director_folder" / "director_config.yaml").read_text())
    config.update(top_level or {})
    config["settings"].update(listen_host=host, listen_port=port)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def write_envoy_config(
    root: Path,
    path: Path,
    data_root: Path,
    category: str,
    rank: int,
    world_size: int,
    cuda_devices: Sequence[int] = (),
    top_level: dict[str, Any] | None = None,
) -> Path:
    """A copy of the project's shard_config.yaml for shard ``rank`` of ``world_size`` of ``data_root/category``;
    the envoy's bundles go to ``<path stem>_bundles`` beside it. ``top_level``: settings added at the top
    (e.g. ``params``)."""
    config = yaml.safe_load((root / "envoy_folder" / "shard_config.yaml").read_text())
    config.update(top_level or {})
    config["params"]["cuda_devices"] = list(cuda_devices)
    config["shard_descriptor"]["params"].update(
        data_folder=str(Path(data_root).resolve()),
        category=category,
        rank_worldsize=f"{rank},{world_size}",
        bundle_folder=str(Path(path).resolve().parent / f"{Path(path).stem}_bundles"),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def envoys_accepted(host: str, port: int, names: Sequence[str], tls: dict[str, Any]) -> Callable[[], bool]:
    """A readiness probe: True once the director's shard registry lists every envoy of ``names`` online."""
    import grpc

    from patchsvdd.federated import FederationError, connect, online_envoys

    federation = None

    def probe() -> bool:
        nonlocal federation
        try:
            federation = federation or connect(host, port, **tls, client_id="harness")
            return set(names) <= online_envoys(federation)
        except (FederationError, OSError, grpc.RpcError):  # not up yet: asked again until the deadline
            return False

    return probe


def start_federation(
    run_dir: Path,
    data_root: Path,
    category: str,
    n_envoys: int = 2,
    port: int | None = None,
    processes: Processes | None = None,
    timeout: float = 120.0,
    tls: bool = False,
    root: Path | None = None,
    envoy_config: dict[str, Any] | None = None,
    director_config: dict[str, Any] | None = None,
    site_roots: Sequence[Path] | None = None,
    director_command: Sequence[str] | None = None,
) -> LocalFederation:
    """Start a director and ``n_envoys`` envoys (shards 1..n of the category) through the start scripts of
    ``root`` (default ``project_root()``). With ``site_roots`` (one data root per envoy, each holding the
    category: sites of their own, e.g. ``data.sites.write_site``) envoy i holds all of ``site_roots[i]``
    and ``n_envoys`` is their number.

    With ``tls`` a fresh authority and certificates are made in ``run_dir/certs``
    and passed to the scripts. ``envoy_config``, ``director_config``: top-level settings added to every envoy's
    shard config and to the
    director's config. ``director_command``: a program run as ``COMMAND director start -c CONFIG --disable-tls``
    in the director's working folder instead of the start script (e.g. a director without the project's
    checks, which passes every experiment on to the sites). Returns once the director lists every envoy
    online. On failure the processes started so far are stopped and
    HarnessError says which node failed and why.
    """
    root = root or project_root()
    processes = processes if processes is not None else Processes()
    port = port or free_port()
    n_envoys = len(site_roots) if site_roots else n_envoys
    run_dir = Path(run_dir).resolve()
    names = [f"envoy_{i}" for i in range(1, n_envoys + 1)]
    certs = run_dir / "certs"
    client_tls: dict[str, Any] = {"tls": False}
    if tls:
        from patchsvdd.system.certs import create_federation_certs

        create_federation_certs(certs, ["localhost"], names)
        client_tls = dict(
            tls=True,
            cert_chain=str(certs / "root_ca.crt"),
            api_cert=str(certs / "frontend.crt"),
            api_private_key=str(certs / "frontend.key"),
        )
    cert_args = [str(certs)] if tls else []  # the start scripts take an optional certificate folder last
    try:
        config = write_director_config(
            root, run_dir / "director" / "director_config.yaml", port, top_level=director_config
        )
        command = [str(root / "director_folder" / "start_director.sh"), str(config), *cert_args]
        if director_command:
            command = [*director_command, "director", "start", "-c", config.name, "--disable-tls"]
        director = processes.start(
            "director",
            command,
            run_dir / "logs" / "director.log",
            env={"PATCHSVDD_WORKDIR": str(run_dir / "director")},
            cwd=config.parent,
        )
        wait_for(lambda: listens("localhost", port, timeout=1.0), timeout, "the director to listen", [director])
        # Envoys on one machine share its cores: oversubscribed BLAS threads slow everyone down.
        threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // n_envoys))
        envoys = []
        for rank, name in enumerate(names, start=1):
            site_root, shard, shards = (site_roots[rank - 1], 1, 1) if site_roots else (data_root, rank, n_envoys)
            config_path = write_envoy_config(
                root, run_dir / "envoys" / f"{name}.yaml", site_root, category, shard, shards, top_level=envoy_config
            )
            envoys.append(
                processes.start(
                    name,
                    [
                        str(root / "envoy_folder" / "start_envoy.sh"),
                        name,
                        str(config_path),
                        "localhost",
                        str(port),
                        *cert_args,
                    ],
                    run_dir / "logs" / f"{name}.log",
                    env={"PATCHSVDD_WORKDIR": str(run_dir / "envoys" / name), "OMP_NUM_THREADS": threads},
                )
            )
        wait_for(
            envoys_accepted("localhost", port, names, client_tls),
            timeout,
            f"the director to list {', '.join(names)} online",
            [director, *envoys],
            poll=1.0,
        )
    except BaseException:
        processes.stop()
        raise
    return LocalFederation("localhost", port, names, processes, client_tls)
