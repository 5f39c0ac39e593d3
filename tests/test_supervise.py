"""The envoy supervisor with a real listening socket standing in for the director and real child processes."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from patchsvdd.federated.local import wait_for


def _listener(port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


def _supervise(port: int, child: list[str], log: Path, timeout: float = 3.0) -> subprocess.Popen:
    with open(log, "w") as handle:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "patchsvdd.system.supervise",
                "--director",
                f"127.0.0.1:{port}",
                "--director-timeout",
                str(timeout),
                "--poll",
                "0.2",
                "--",
                *child,
            ],
            stdout=handle,
            stderr=subprocess.STDOUT,
        )


def test_child_exit_code_is_passed_on_while_the_director_listens(tmp_path: Path) -> None:
    with _listener() as director:
        result = _supervise(director.getsockname()[1], [sys.executable, "-c", "raise SystemExit(7)"], tmp_path / "log")
        assert result.wait(timeout=30) == 7


def test_envoy_is_restarted_when_the_director_comes_back_and_stopped_when_it_does_not(tmp_path: Path) -> None:
    starts = tmp_path / "starts"
    child = [sys.executable, "-c", f"open({str(starts)!r}, 'a').write('x'); import time; time.sleep(600)"]
    director = _listener()
    port = director.getsockname()[1]
    log = tmp_path / "supervise.log"
    supervisor = _supervise(port, child, log, timeout=4.0)
    try:
        wait_for(lambda: starts.exists() and starts.read_text() == "x", 30, "the first start")
        director.close()  # the director goes away, is seen to be away ...
        wait_for(lambda: "is unreachable" in log.read_text(), 30, "the supervisor to notice")
        director = _listener(port)  # ... and comes back on the same port
        wait_for(lambda: starts.read_text() == "xx", 30, "the restart")
        director.close()  # gone for good: the supervisor gives up after --director-timeout
        assert supervisor.wait(timeout=30) == 3
    finally:
        director.close()
        supervisor.kill()
    err = log.read_text()
    assert "is back: restarting the envoy so that it registers again (restart 1)" in err
    assert "did not come back within 4 s: stopping this envoy" in err
