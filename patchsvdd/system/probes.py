"""TCP probes shared by the notebook side, the envoy supervisor and the process harness (standard library only)."""

from __future__ import annotations

import socket
import time


def listens(host: str, port: int, timeout: float = 3.0) -> bool:
    """True when a TCP connection to ``host:port`` opens within ``timeout`` seconds (with or without TLS)."""
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError:
        return False
    return True


def still_listens_after(host: str, port: int, seconds: float) -> bool:
    """False as soon as ``host:port`` refuses connections, True when it still listens after ``seconds``
    (a killed process takes a moment to close its port)."""
    deadline = time.monotonic() + seconds
    while listens(host, port, timeout=1.0):
        if time.monotonic() > deadline:
            return True
        time.sleep(0.2)
    return False


DEFAULT_PORTS = frozenset({50050, 50051})  # the director's and the aggregator's, as the shipped configs give them


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now, never one of ``DEFAULT_PORTS`` (which the
    project's start steps as written take, perhaps a moment later, beside whatever asked for this one)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in DEFAULT_PORTS:
            return port


def service_healthy(url: str, timeout: float = 2.0) -> bool:
    """True when ``patchsvdd serve`` at ``url`` answers ``GET /health`` with 200 within ``timeout`` seconds."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as answer:
            return bool(answer.status == 200)
    except (OSError, urllib.error.URLError):
        return False
