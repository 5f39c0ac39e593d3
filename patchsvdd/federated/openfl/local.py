"""A director and its envoys on this machine, through the project's start scripts: the demo's, the tests' and
the benchmarks' OpenFL federation (``start_federation``); the process harness is ``patchsvdd.federated.local``."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from patchsvdd.federated.local import (
    Processes,
    project_root,
    wait_for,
    write_envoy_config,
)
from patchsvdd.system.probes import free_port, listens


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
