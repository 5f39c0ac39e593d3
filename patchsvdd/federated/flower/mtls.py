"""Mutual TLS on Flower: the SuperLink's one port (Fleet, Control and Runtime APIs) asks every client for a
certificate of the federation's authority (``patchsvdd certs``), and this project's Flower clients show theirs.

Flower 1.42 serves TLS with the SuperLink's certificate and asks no client for one (``uvicorn.run`` without
``ssl_cert_reqs``; its gRPC servers with ``require_client_auth=False``), and its protobuf-over-HTTP clients
(``flwr.supercore.protobuf.client.ProtobufClient``) present none. Two patches, one a side:

- ``require_client_certificates(ca)``: in the SuperLink's process, uvicorn requires a certificate issued by
  ``ca`` on every connection, and so does any gRPC server Flower starts with TLS;
- ``present_client_certificate(cert, key)``: in a client's process (a SuperNode, the driver, Flower's CLI for
  ``flwr run`` and ``flwr supernode register``), every HTTPS connection shows ``cert``.

``python -m patchsvdd.federated.flower.mtls superlink CA -- ARGS`` runs ``flower-superlink ARGS`` with the first;
``python -m patchsvdd.federated.flower.mtls flwr CERT KEY -- ARGS`` runs Flower's CLI with the second. A test
fails where a Flower release moves either place (``patch_points``).
"""

from __future__ import annotations

import socket
import ssl
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def patch_points() -> tuple[Any, Any, Any]:
    """The places the patches change: uvicorn's ``run``, gRPC's server credentials, Flower's HTTP client."""
    import grpc
    import uvicorn
    from flwr.supercore.protobuf.client import ProtobufClient

    for owner, name in ((uvicorn, "run"), (grpc, "ssl_server_credentials"), (ProtobufClient, "__init__")):
        if not callable(getattr(owner, name, None)):
            raise RuntimeError(f"{owner.__name__}.{name} is gone: see patchsvdd.federated.flower.mtls")
    return uvicorn, grpc, ProtobufClient


def require_client_certificates(ca: str | Path) -> None:
    """Every TLS server of this process asks each client for a certificate issued by ``ca``."""
    uvicorn, grpc, _ = patch_points()
    run, credentials = uvicorn.run, grpc.ssl_server_credentials

    def run_asking(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("ssl_certfile"):
            kwargs.update(ssl_ca_certs=str(ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
        return run(*args, **kwargs)

    def credentials_asking(pairs: Any, root_certificates: bytes | None = None, **kwargs: Any) -> Any:
        kwargs["require_client_auth"] = True
        return credentials(pairs, root_certificates or Path(ca).read_bytes(), **kwargs)

    uvicorn.run, grpc.ssl_server_credentials = run_asking, credentials_asking


def client_context(verify: ssl.SSLContext | str | bool, cert: str | Path, key: str | Path) -> ssl.SSLContext:
    """``verify`` (a context, a CA file, or True: the system's authorities) as a context that shows ``cert``."""
    if isinstance(verify, ssl.SSLContext):
        context = verify
    elif isinstance(verify, str):
        context = ssl.create_default_context(cafile=verify)
    else:
        context = ssl.create_default_context()
    context.load_cert_chain(str(cert), str(key))
    return context


_SHOWN: list[tuple[str, str]] = []  # the certificate and key this process's clients show (the latest given)


def present_client_certificate(cert: str | Path, key: str | Path) -> None:
    """Every HTTPS connection of Flower's clients in this process shows ``cert`` (its key: ``key``); given
    again, the newest pair is shown."""
    _, _, client = patch_points()
    client_context(True, cert, key)  # a certificate that does not load stops here, naming its file
    first = not _SHOWN
    _SHOWN[:] = [(str(cert), str(key))]
    if not first:
        return
    create: Callable[..., None] = client.__init__

    def create_showing(self: Any, base_url: str, *, verify: Any = True, **kwargs: Any) -> None:
        if base_url.startswith("https://"):
            verify = client_context(verify, *_SHOWN[0])
        create(self, base_url, verify=verify, **kwargs)

    client.__init__ = create_showing


def answers(address: str, ca: str | Path, cert: str | Path, key: str | Path, timeout: float = 10.0) -> bool:
    """Whether the SuperLink at ``address`` (HOST:PORT) answers a request from a client showing ``cert``: it
    closes the connection without an answer when it refuses the certificate."""
    host, _, port = address.rpartition(":")
    context = client_context(str(ca), cert, key)
    context.check_hostname = False  # the question is the client's certificate, not the server's name
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname=host.strip("[]")) as tls:
                tls.sendall(b"GET / HTTP/1.1\r\nHost: superlink\r\nConnection: close\r\n\r\n")
                return tls.recv(16).startswith(b"HTTP/")
    except (OSError, ssl.SSLError):
        return False


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if "--" not in args or not args or args[0] not in ("superlink", "flwr"):
        print(
            "usage: python -m patchsvdd.federated.flower.mtls superlink CA -- ARGS | flwr CERT KEY -- ARGS",
            file=sys.stderr,
        )
        return 2
    split = args.index("--")
    role, given, rest = args[0], args[1:split], args[split + 1 :]
    if role == "superlink" and len(given) == 1:
        require_client_certificates(given[0])
        from flwr.superlink.cli import flower_superlink

        sys.argv = ["flower-superlink", *rest]
        return int(flower_superlink() or 0)
    if role == "flwr" and len(given) == 2:
        present_client_certificate(*given)
        from flwr.cli.app import app

        sys.argv = ["flwr", *rest]
        return int(app() or 0)
    print(f"mtls {role}: expected {'CA' if role == 'superlink' else 'CERT KEY'} before --", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
