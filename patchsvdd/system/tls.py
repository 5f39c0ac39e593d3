"""One TLS handshake with the director before a node starts, so that failures read as sentences.

gRPC reports a refused certificate only as ``UNAVAILABLE ... Socket closed``;
this module connects once with Python's ``ssl`` and says what is wrong: the
director is unreachable, does not speak TLS, is not trusted, or refused the
node's certificate. ``python -m patchsvdd.system.tls check HOST PORT CA CERT KEY``;
``python -m patchsvdd.system.tls reach HOST PORT`` only checks that the director listens.
"""

from __future__ import annotations

import socket
import ssl
import sys

from patchsvdd.errors import exit_code


class TLSCheckError(ConnectionError):
    """The node cannot talk to the director over (mutual) TLS; the message says why."""


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    try:
        return socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise TLSCheckError(
            f"cannot reach the director at {host}:{port} ({exc.strerror or exc}); is it running, "
            "and are host and port right?"
        ) from exc


def speaks_tls(host: str, port: int, timeout: float = 5.0) -> bool:
    """Whether the server at host:port completes a TLS handshake (its certificate is not checked)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    with _connect(host, port, timeout) as raw:
        try:
            with context.wrap_socket(raw, server_hostname=host):
                return True
        except (ssl.SSLError, OSError):
            return False


def check_mutual_tls(host: str, port: int, ca_cert: str, cert: str, key: str, timeout: float = 10.0) -> None:
    """Handshake with the director as this node; TLSCheckError with a plain explanation when it fails."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.set_alpn_protocols(["h2"])
    try:
        context.load_verify_locations(ca_cert)
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise TLSCheckError(f"cannot load the TLS files {ca_cert}, {cert}, {key}: {exc}") from exc
    raw = _connect(host, port, timeout)
    try:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            tls.settimeout(3.0)
            try:
                # TLS 1.3 checks the client certificate after the handshake: a refusal arrives as an
                # alert or as a closed connection, an acceptance as the server's HTTP/2 settings frame.
                if tls.recv(1) == b"":
                    raise ConnectionResetError("closed after the handshake")
            except TimeoutError:
                pass
    except ssl.SSLCertVerificationError as exc:
        raise TLSCheckError(
            f"the director at {host}:{port} is not trusted: its certificate {exc.verify_message} "
            f"(it must be issued by {ca_cert} and name '{host}')"
        ) from exc
    except ssl.SSLError as exc:
        reason = (exc.reason or str(exc)).upper()
        if any(
            word in reason
            for word in (
                "UNKNOWN_CA",
                "BAD_CERTIFICATE",
                "CERTIFICATE_UNKNOWN",
                "CERTIFICATE_REQUIRED",
                "DECRYPT_ERROR",
                "HANDSHAKE_FAILURE",
            )
        ):
            raise TLSCheckError(
                f"the director at {host}:{port} refused this node's certificate {cert}: it was not issued by the "
                "federation's authority (or names another node)"
            ) from exc
        if any(word in reason for word in ("WRONG_VERSION", "RECORD_LAYER", "PACKET_LENGTH", "UNEXPECTED_EOF")):
            raise TLSCheckError(
                f"the director at {host}:{port} does not speak TLS: start it with "
                "a certificate folder (start_director.sh CONFIG CERT_DIR), or start this node without TLS"
            ) from exc
        raise TLSCheckError(f"TLS handshake with the director at {host}:{port} failed: {exc}") from exc
    except (ConnectionResetError, BrokenPipeError) as exc:
        raise TLSCheckError(
            f"the director at {host}:{port} closed the connection during the TLS handshake: "
            f"it refused this node's certificate {cert}"
        ) from exc
    finally:
        raw.close()


def check_reachable(host: str, port: int, timeout: float = 10.0) -> None:
    """TLSCheckError unless something listens at host:port."""
    _connect(host, port, timeout).close()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    usage = "usage: python -m patchsvdd.system.tls check HOST PORT CA_CERT CERT KEY | reach HOST PORT"
    if not ((len(args) == 6 and args[0] == "check") or (len(args) == 3 and args[0] == "reach")):
        print(usage, file=sys.stderr)
        return 2
    if args[0] == "reach":
        return exit_code(lambda: check_reachable(args[1], int(args[2])), TLSCheckError, "TLS: ")
    return exit_code(lambda: check_mutual_tls(args[1], int(args[2]), args[3], args[4], args[5]), TLSCheckError, "TLS: ")


if __name__ == "__main__":
    sys.exit(main())
