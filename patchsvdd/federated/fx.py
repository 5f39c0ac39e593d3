"""OpenFL's ``fx`` command with the director's fixed waits cut short.

``python -m patchsvdd.federated.fx director start ...`` is ``fx director start ...`` (what
``director_folder/start_director.sh`` runs), except that OpenFL 1.7.1's fixed sleeps in the director
process wait at most ``POLL_SECONDS``:

- ``Aggregator._get_sleep_time`` (10 s): what a collaborator with no task ready is told to sleep, each
  time it waits for the other sites to finish a round, and before its quit job;
- the director's experiment queue (``get_next_experiment``) and the aggregator's wait for its quit jobs
  (``_run_aggregator_grpc_server``), both ``asyncio.sleep(10)`` in
  ``openfl/component/director/experiment.py``.

Only those: the patch replaces the aggregator's static method and that one module's ``asyncio`` name
with a view of :mod:`asyncio` whose ``sleep`` is capped; every other sleep, timeout and module is
OpenFL's own. A collaborator, a queue or a server then notices its change within a second instead of
ten, which saves about 25 s per experiment plus up to 10 s per round (docs/benchmarks.md, "Round overhead").
"""

from __future__ import annotations

import asyncio
import sys
from types import ModuleType
from typing import Any

POLL_SECONDS = 1  # an int: OpenFL sends the collaborator's sleep as an integer field


class CappedAsyncio(ModuleType):
    """:mod:`asyncio` as seen by one module, except that ``sleep(delay)`` waits at most ``cap`` seconds."""

    def __init__(self, cap: float) -> None:
        super().__init__("asyncio")
        self.cap = cap

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    def sleep(self, delay: float, result: Any = None):  # noqa: D102 - asyncio.sleep's signature
        return asyncio.sleep(min(delay, self.cap), result)


def cut_fixed_waits(seconds: int = POLL_SECONDS) -> None:
    """Patch OpenFL 1.7.1's fixed waits of the director process to ``seconds`` (see the module's docstring)."""
    from openfl.component.aggregator.aggregator import Aggregator
    from openfl.component.director import experiment

    Aggregator._get_sleep_time = staticmethod(lambda: seconds)
    experiment.asyncio = CappedAsyncio(seconds)


def main(argv: list[str] | None = None) -> None:
    """Run OpenFL's ``fx`` command line with ``argv`` (default: this process's arguments), waits cut."""
    cut_fixed_waits()
    from openfl.interface.cli import entry

    sys.argv = ["fx", *(sys.argv[1:] if argv is None else argv)]
    entry()


if __name__ == "__main__":
    main()
