"""``flower-supernode`` with its fixed waits cut (what ``nodes.py`` starts at a site).

Flower 1.42's SuperNode asks the SuperLink for a message every 3 s when it has none, and looks for a reply
to send every 0.5 s (``time.sleep`` in ``flwr/supernode/start_client_internal.py``), so every exchange of a
round waits for them. This runs Flower's own SuperNode with those waits at most ``PATCHSVDD_FLOWER_POLL``
seconds (default 0.25), as ``federated/openfl/fx.py`` cuts OpenFL's fixed 10-second waits; nothing else changes.
``wait_module`` fails loudly where a Flower release has moved the waits.
"""

from __future__ import annotations

import os
import sys
import time
from types import ModuleType, SimpleNamespace

POLL = float(os.environ.get("PATCHSVDD_FLOWER_POLL", "0.25"))


def capped_clock(poll: float = POLL) -> SimpleNamespace:
    """The ``time`` module, except that ``sleep`` waits at most ``poll`` seconds."""
    clock = SimpleNamespace(**{name: getattr(time, name) for name in dir(time) if not name.startswith("__")})
    clock.sleep = lambda seconds: time.sleep(min(float(seconds), poll))
    return clock


def wait_module() -> ModuleType:
    """Flower's SuperNode loop, checked to hold its waits as ``time.sleep`` of the ``time`` module."""
    from flwr.supernode import start_client_internal

    if getattr(start_client_internal, "time", None) is not time:
        raise RuntimeError(
            "flwr.supernode.start_client_internal no longer waits with the time module: this Flower release "
            "is not the one patchsvdd.federated.flower.supernode knows (flwr 1.42)"
        )
    return start_client_internal


def main() -> int:
    wait_module().time = capped_clock()  # type: ignore[attr-defined]
    shown = os.environ.get("PATCHSVDD_FLOWER_CLIENT_CERTIFICATE")  # nodes.CLIENT_CERTIFICATE: mutual TLS
    if shown:
        from patchsvdd.federated.flower.mtls import present_client_certificate

        present_client_certificate(*shown.split(os.pathsep, 1))
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"
    return int(flower_supernode() or 0)


if __name__ == "__main__":
    sys.exit(main())
