"""OpenFL's ``fx`` command, with this project's patches of OpenFL 1.7.1 in the director and envoy processes.

``python -m patchsvdd.federated.openfl.fx envoy start ...`` is ``fx envoy start ...`` (what
``envoy_folder/start_envoy.sh`` runs) with the site guard installed first (``site_guard.install_site_guard``:
the envoy takes only data from a client and builds what it runs from its own code).

``python -m patchsvdd.federated.openfl.fx director start ...`` is ``fx director start ...`` (what
``director_folder/start_director.sh`` runs) with each submitted experiment checked and reviewed as the envoys
review it, and built from the director's own code (``site_guard.install_director_guard``), an experiment that a
site failed or refused kept failed (``keep_site_failures``), and OpenFL 1.7.1's fixed sleeps in the director
process waiting at most ``POLL_SECONDS``:

- ``Aggregator._get_sleep_time`` (10 s): what a collaborator with no task ready is told to sleep, each
  time it waits for the other sites to finish a round, and before its quit job;
- the director's experiment queue (``get_next_experiment``) and the aggregator's wait for its quit jobs
  (``_run_aggregator_grpc_server``), both ``asyncio.sleep(10)`` in
  ``openfl/component/director/experiment.py``.

Only those: the patch replaces the aggregator's static method and that one module's ``asyncio`` name
with a view of :mod:`asyncio` whose ``sleep`` is capped; every other sleep, timeout and module is
OpenFL's own. A collaborator, a queue or a server then notices its change within a second instead of
ten (what that saves: docs/benchmarks.md, "Round overhead").
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


def keep_site_failures() -> None:
    """Patch OpenFL 1.7.1's director so that an experiment a site failed (or refused) stays failed:

    - its status: ``Director.set_experiment_failed`` sets FAILED, but the experiment's own end then sets
      FINISHED, so a client would see a refused experiment as finished, without a metric;
    - the site's queue: the director remembers the experiment as that envoy's current one and, while its
      rounds are not done, hands the same experiment to the envoy's next ``wait_experiment`` again, so a
      refused experiment would come back for ever and the envoy never get the next one;
    - an experiment whose aggregator never started: OpenFL would fail the call (it stops the aggregator),
      and every later ``wait_experiment`` of that envoy too.
    """
    from openfl.component.director import experiment as experiment_module
    from openfl.component.director.director import Director

    set_failed = Director.set_experiment_failed
    start = experiment_module.Experiment.start

    def set_experiment_failed(self, *, experiment_name: str, collaborator_name: str) -> None:
        experiment = self.experiments_registry.get(experiment_name)
        if experiment is not None and experiment.aggregator is None:  # it never started: nothing to stop
            experiment.status = experiment_module.Status.FAILED
        else:
            set_failed(self, experiment_name=experiment_name, collaborator_name=collaborator_name)
        if experiment_name in self.experiments_registry:
            self.experiments_registry[experiment_name].failed_at = collaborator_name
        if self.col_exp.get(collaborator_name) == experiment_name:
            self.col_exp[collaborator_name] = None

    async def start_and_keep_failure(self, *args: Any, **kwargs: Any) -> None:
        await start(self, *args, **kwargs)
        if getattr(self, "failed_at", None) is not None:
            self.status = experiment_module.Status.FAILED

    Director.set_experiment_failed = set_experiment_failed
    experiment_module.Experiment.start = start_and_keep_failure


def _config_named(argv: list[str], *flags: str) -> dict:
    """The YAML config that one of ``flags`` names in ``argv`` (an empty mapping when none does)."""
    from patchsvdd.system.configs import read_yaml

    for flag in flags:
        if flag in argv[:-1]:
            return read_yaml(argv[argv.index(flag) + 1])
    return {}


def envoy_allows(argv: list[str]) -> dict[str, bool]:
    """What the shard config named by ``-ec``/``--envoy-config-path`` in ``argv`` allows: ``install_requirements``
    (``params``), only where it says ``true`` (OpenFL's default would be true)."""
    config = _config_named(argv, "-ec", "--envoy-config-path")
    return {"install_requirements": (config.get("params") or {}).get("install_requirements") is True}


def director_allows(argv: list[str]) -> dict[str, bool]:
    """What the director config named by ``-c``/``--director-config-path`` in ``argv`` allows:
    ``settings.install_requirements``, only where it says ``true``."""
    config = _config_named(argv, "-c", "--director-config-path")
    return {"install_requirements": (config.get("settings") or {}).get("install_requirements") is True}


def main(argv: list[str] | None = None) -> None:
    """Run OpenFL's ``fx`` command line with ``argv`` (default: this process's arguments), patched for its role."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["envoy"]:
        from patchsvdd.federated.names import ExperimentRefused, check_name
        from patchsvdd.federated.openfl.site_guard import install_site_guard

        for flag in ("-n", "--shard-name"):
            if flag in args[:-1]:
                try:
                    check_name(args[args.index(flag) + 1], "the envoy's name")
                except ExperimentRefused as exc:  # experiments name their sites: a plain name, as theirs
                    print(f"envoy: {exc}", file=sys.stderr)
                    sys.exit(2)

        install_site_guard(**envoy_allows(args))
    elif args[:1] == ["director"]:
        from patchsvdd.federated.openfl.site_guard import install_director_guard

        cut_fixed_waits()
        keep_site_failures()
        install_director_guard(**director_allows(args))
    from openfl.interface.cli import entry

    sys.argv = ["fx", *args]
    entry()


if __name__ == "__main__":
    main()
