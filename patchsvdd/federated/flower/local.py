"""A Flower federation on this machine through the project's start scripts (the demo's, the tests' and the
benchmarks'): a SuperLink and one site per shard, each in its own session, ready when each says so.

Readiness is what each process states once it is so: the SuperLink launcher once its port listens and the
sites' keys are registered, each site once the SuperLink has admitted its SuperNode (``nodes.py``), polled
with a deadline.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from patchsvdd.federated.flower.driver import SuperLink
from patchsvdd.federated.flower.nodes import SECRET_FILE
from patchsvdd.federated.local import Node, Processes, log_contains, project_root, wait_for, write_envoy_config
from patchsvdd.system.probes import free_port


@dataclass
class LocalFlower:
    """A running SuperLink and its sites."""

    superlink: SuperLink
    sites: list[str]
    processes: Processes
    configs: dict[str, Path]


def start_site(
    processes: Processes,
    root: Path,
    run_dir: Path,
    name: str,
    config: Path,
    port: int,
    certs: Path | None,
    threads: str,
) -> Node:
    """Start site ``name`` through ``envoy_folder/start_supernode.sh`` (not waiting for it)."""
    command = [str(root / "envoy_folder" / "start_supernode.sh"), name, str(config), "127.0.0.1", str(port)]
    return processes.start(
        name,
        [*command, *([str(certs)] if certs else [])],
        run_dir / "logs" / f"{name}.log",
        env={"PATCHSVDD_WORKDIR": str(run_dir / "sites" / name), "OMP_NUM_THREADS": threads},
    )


def start_flower_federation(
    run_dir: Path,
    data_root: Path,
    category: str,
    n_sites: int = 2,
    processes: Processes | None = None,
    tls: bool = False,
    root: Path | None = None,
    timeout: float = 120.0,
) -> LocalFlower:
    """Start a SuperLink and ``n_sites`` sites (shards 1..n of the category) through the start scripts; return
    once every site is admitted. With ``tls`` a fresh authority, certificates and site keys are made in
    ``run_dir/certs``: TLS, and only the sites' keys admitted. On failure everything started is stopped and
    HarnessError says which process failed and why."""
    root = root or project_root()
    processes = processes if processes is not None else Processes()
    run_dir = Path(run_dir).resolve()
    names = [f"site_{i}" for i in range(1, n_sites + 1)]
    certs = run_dir / "certs" if tls else None
    if certs is not None:
        from patchsvdd.system.certs import create_federation_certs

        create_federation_certs(certs, ["localhost"], names)
    port = free_port()
    try:
        link = processes.start(
            "superlink",
            [str(root / "director_folder" / "start_superlink.sh"), str(port), *([str(certs)] if certs else [])],
            run_dir / "logs" / "superlink.log",
            env={"PATCHSVDD_WORKDIR": str(run_dir / "superlink")},
        )
        wait_for(lambda: log_contains(link.log, "superlink: ready"), timeout, "the SuperLink", [link])
        threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // n_sites))
        configs, sites = {}, []
        for rank, name in enumerate(names, start=1):
            configs[name] = write_envoy_config(
                root, run_dir / "sites" / f"{name}.yaml", data_root, category, rank, n_sites
            )
            sites.append(start_site(processes, root, run_dir, name, configs[name], port, certs, threads))
        for node in sites:
            wait_for(partial(log_contains, node.log, "ready, app"), timeout, f"{node.name}", [link, node])
    except BaseException:
        processes.stop()
        raise
    superlink = SuperLink(
        f"127.0.0.1:{port}",
        run_dir / "superlink" / SECRET_FILE,
        root_certificates=None if certs is None else certs / "root_ca.crt",
        insecure=certs is None,
        client_certificate=None if certs is None else (certs / "frontend.crt", certs / "frontend.key"),
    )
    return LocalFlower(superlink, names, processes, configs)
