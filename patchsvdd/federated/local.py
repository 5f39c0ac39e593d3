"""The harness of federations on this machine: processes started through the project's start scripts, each in
its own session so that it stops with its children, and readiness polled with a deadline, never a fixed sleep.
Each engine's federation is started by its own ``local`` (``openfl.local``: a director and envoys;
``flower.local``: a SuperLink and sites), with the shard configs written here. Used by ``make demo``, the tests
and the benchmarks. The start scripts live in a project checkout (``project_root``), not in the installed
package.
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
