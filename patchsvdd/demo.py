"""The one-command federated demo: data, a director, envoys, the notebook, a summary.

``python -m patchsvdd.demo`` (what ``make demo`` runs) writes everything under
``runs/<time>/``: process logs, configs, the executed notebook, metrics and
pictures. Processes are started through the repository's start scripts,
readiness is read from their logs (polled, never a fixed sleep), and every
process started is stopped on success, failure or Ctrl-C.

This module starts processes; it does not import OpenFL.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import yaml

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "workspace" / "PatchSVDD_with_Director.ipynb"
DIRECTOR_READY = "Starting director server on"
FRESH_LR, FRESH_WARMUP = 1e-3, 40  # the CPU recipe, scaled to the demo's budget
FINETUNE_LR, FINETUNE_WARMUP = 1e-5, 0  # from a trained encoder: small steps keep what it knows
SHARD_ACCEPTED = "Director accepted shard for {name}"


class DemoError(RuntimeError):
    """A step of the demo failed; the message says which and where its log is."""


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a log, or '' when it does not exist."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


@dataclass
class Node:
    """A started process with its log."""

    name: str
    process: subprocess.Popen
    log: Path


@dataclass
class Processes:
    """Processes started in their own sessions, so that each can be stopped with all its children."""

    nodes: list[Node] = field(default_factory=list)

    def start(self, name: str, command: Sequence[str], log: Path, env: dict[str, str] | None = None) -> Node:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as handle:
            process = subprocess.Popen(
                list(command), stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})}, start_new_session=True,
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

    def __enter__(self) -> "Processes":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def wait_for(condition: Callable[[], bool], timeout: float, what: str, watch: Sequence[Node] = (), poll: float = 0.2) -> None:
    """Poll ``condition`` until true; DemoError when ``timeout`` passes or a watched process exits first."""
    deadline = time.monotonic() + timeout
    while not condition():
        for node in watch:
            if node.process.poll() is not None:
                raise DemoError(
                    f"{node.name} exited (code {node.process.returncode}) while waiting for {what}; "
                    f"its log {node.log} ends with:\n{tail(node.log)}"
                )
        if time.monotonic() > deadline:
            logs = "; ".join(str(n.log) for n in watch)
            raise DemoError(f"timed out after {timeout:.0f} s waiting for {what} (logs: {logs})")
        time.sleep(poll)


def log_contains(path: Path, text: str) -> bool:
    try:
        return text in path.read_text(errors="replace")
    except FileNotFoundError:
        return False


@dataclass
class Federation:
    """A running director and its envoys; ``tls`` holds the notebook's TLS parameters when mutual TLS is on."""

    host: str
    port: int
    envoys: list[str]
    processes: Processes
    tls: dict[str, object] = field(default_factory=lambda: {"tls": False})


def write_director_config(path: Path, port: int, host: str = "localhost") -> Path:
    """A copy of director_folder/director_config.yaml listening on ``host:port``."""
    config = yaml.safe_load((REPO / "director_folder" / "director_config.yaml").read_text())
    config["settings"].update(listen_host=host, listen_port=port)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def write_envoy_config(path: Path, data_root: Path, category: str, rank: int, world_size: int, cuda_devices: Sequence[int] = ()) -> Path:
    """A copy of envoy_folder/shard_config.yaml for shard ``rank`` of ``world_size`` of ``data_root/category``."""
    config = yaml.safe_load((REPO / "envoy_folder" / "shard_config.yaml").read_text())
    config["params"]["cuda_devices"] = list(cuda_devices)
    config["shard_descriptor"]["params"].update(
        data_folder=str(Path(data_root).resolve()), category=category, rank_worldsize=f"{rank},{world_size}",
        bundle_folder=str(Path(path).resolve().parent / f"{Path(path).stem}_bundles"),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def start_federation(
    run_dir: Path, data_root: Path, category: str, n_envoys: int = 2, port: int | None = None,
    processes: Processes | None = None, timeout: float = 120.0, tls: bool = False,
) -> Federation:
    """Start a director and ``n_envoys`` envoys (shards 1..n of the category) through the start scripts.

    With ``tls`` a fresh authority and certificates are made in ``run_dir/certs``
    and the TLS start scripts are used. Returns once the director has accepted
    every shard. On failure the processes started so far are stopped and
    DemoError says which node failed and why.
    """
    processes = processes if processes is not None else Processes()
    port = port or free_port()
    run_dir = Path(run_dir).resolve()
    names = [f"envoy_{i}" for i in range(1, n_envoys + 1)]
    certs = run_dir / "certs"
    suffix = "_with_tls.sh" if tls else ".sh"
    cert_args = [str(certs)] if tls else []  # the TLS scripts take the certificate folder last
    client_tls: dict[str, object] = {"tls": False}
    if tls:
        from .certs import create_federation_certs

        create_federation_certs(certs, ["localhost"], names)
        client_tls = dict(tls=True, cert_chain=str(certs / "root_ca.crt"), api_cert=str(certs / "frontend.crt"),
                          api_private_key=str(certs / "frontend.key"))
    try:
        config = write_director_config(run_dir / "director" / "director_config.yaml", port)
        director = processes.start(
            "director", [str(REPO / "director_folder" / f"start_director{suffix}"), str(config), *cert_args],
            run_dir / "logs" / "director.log", env={"PATCHSVDD_WORKDIR": str(run_dir / "director")},
        )
        wait_for(lambda: log_contains(director.log, DIRECTOR_READY), timeout, "the director to listen", [director])
        # Envoys on one machine share its cores: oversubscribed BLAS threads slow everyone down.
        threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // n_envoys))
        envoys = []
        for rank, name in enumerate(names, start=1):
            shard = write_envoy_config(run_dir / "envoys" / f"{name}.yaml", data_root, category, rank, n_envoys)
            envoys.append(processes.start(
                name, [str(REPO / "envoy_folder" / f"start_envoy{suffix}"), name, str(shard), "localhost", str(port),
                       *cert_args],
                run_dir / "logs" / f"{name}.log",
                env={"PATCHSVDD_WORKDIR": str(run_dir / "envoys" / name), "OMP_NUM_THREADS": threads},
            ))
        for name in names:
            wait_for(
                lambda name=name: log_contains(director.log, SHARD_ACCEPTED.format(name=name)),
                timeout, f"the director to accept {name}", [director, *envoys],
            )
    except BaseException:
        processes.stop()
        raise
    return Federation("localhost", port, names, processes, client_tls)


def run_notebook(output: Path, parameters: dict, timeout: float, cwd: Path) -> None:
    """Execute the notebook headless with papermill; the executed copy is ``output``."""
    import papermill

    papermill.execute_notebook(
        str(NOTEBOOK), str(output), parameters=parameters, cwd=str(cwd), kernel_name="python3",
        execution_timeout=int(timeout), progress_bar=False, log_output=False,
    )


def ensure_demo_data(data_root: Path, category: str, seed: int = 0) -> Path:
    """Generate the built-in demo category under ``data_root`` unless this version already wrote it."""
    import shutil

    from .synth import SYNTH_VERSION, generate_category, generated_version

    folder = data_root / category
    if generated_version(folder) != SYNTH_VERSION:
        if folder.exists():
            shutil.rmtree(folder)
        print(f"generating demo data {folder}")
        generate_category(data_root, category, seed=seed)
    return data_root


def initial_checkpoint(init: str, category: str, run_dir: Path) -> Path | None:
    """The checkpoint the federation starts from: None for 'fresh'; the released encoder of ``category``
    ('official' or a released .pkl file) imported into ``run_dir``; or a project checkpoint as given."""
    if init == "fresh":
        return None
    from .checkpoint import load_checkpoint, save_checkpoint
    from .released import import_released

    path = Path(init)
    if init != "official" and path.suffix == ".pt":
        load_checkpoint(path)  # a bad file fails here, before any process starts
        return path.resolve()
    model, meta = import_released(category, None if init == "official" else path)
    out = run_dir / "initial.pt"
    save_checkpoint(model, out, imported=meta, category=category)
    print(f"starting from the released {category} encoder ({meta['file']}, SHA-256 {meta['sha256'][:12]}...)")
    return out


def summarise(run_dir: Path, seconds: float) -> str:
    """A few lines: where results are, untrained against trained, the final metrics, the time."""
    from .report import fmt, untrained_vs_trained

    results = run_dir / "notebook"
    lines = [f"demo finished in {seconds:.0f} s; results in {run_dir}"]
    learning = untrained_vs_trained(json.loads((results / "round_metrics.json").read_text()))
    lines.append("  untrained (round 0) -> trained (final round), per-round validation on each envoy's own data:")
    for row in learning:
        shown = "  ".join(f"{key} {fmt(row[f'{key} untrained'])} -> {fmt(row[f'{key} trained'])}"
                          for key in ("heldout_pos", "det_sum", "seg_sum"))
        lines.append(f"  {row['node']:10s} {shown}")
    final = json.loads((results / "metrics.json").read_text())
    lines.append(f"  final evaluation of the {final['model']} model ({final['search']} search):")
    for node, metrics in sorted(final["per_node"].items()):
        lines.append(f"  {node:10s} " + " ".join(f"{k}={fmt(v)}" for k, v in metrics.items()))
    bundles = results / "bundles.json"
    if bundles.is_file():
        lines.append("  inspection bundles written at the sites (patchsvdd predict BUNDLE IMAGES --out DIR, or serve BUNDLE):")
        for row in json.loads(bundles.read_text()):
            lines.append(f"  {row['envoy']:10s} {row['bundle at the site']} (image threshold "
                         f"{fmt(row['image_threshold'])}, {row['bundle_mb']:.1f} MB)")
    local = results / "local_metrics.json"
    if local.is_file():
        metrics = json.loads(local.read_text())
        lines.append("  notebook   " + " ".join(f"{k}={fmt(v)}" for k, v in metrics.items()))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m patchsvdd.demo", description="Run the federated Patch SVDD demo end to end.")
    p.add_argument("--data-root", type=Path, default=os.environ.get("DATA_ROOT") or None,
                   help="MVTec-layout data root (default: built-in demo data in data/demo; env DATA_ROOT)")
    p.add_argument("--category", default=os.environ.get("CATEGORY") or "washer", help="category (env CATEGORY)")
    p.add_argument("--envoys", type=int, default=2)
    p.add_argument("--rounds", type=int, default=int(os.environ.get("ROUNDS") or 5))
    p.add_argument("--repeat", type=int, default=100)
    p.add_argument("--max-steps", type=int, default=int(os.environ.get("MAX_STEPS") or 80),
                   help="steps per envoy per round (0: full epochs)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--init", default=os.environ.get("INIT") or "fresh",
                   help="fresh (a new model), official (the authors' released encoder of --category: downloaded once, "
                        "SHA-256 checked, cached), or a checkpoint .pt or released .pkl file (env INIT)")
    p.add_argument("--lr", type=float, default=None,
                   help=f"peak learning rate (default {FRESH_LR:g} from scratch, {FINETUNE_LR:g} when fine-tuning)")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help=f"linear warm-up, then cosine decay over all rounds (default {FRESH_WARMUP} from scratch, "
                        f"{FINETUNE_WARMUP} when fine-tuning)")
    p.add_argument("--final-search", choices=("exact", "fast"), default="fast")
    p.add_argument("--tls", action="store_true", default=os.environ.get("TLS", "0") not in ("", "0"),
                   help="mutual TLS between all nodes with fresh certificates (env TLS=1)")
    p.add_argument("--runs-dir", type=Path, default=REPO / "runs")
    p.add_argument("--timeout", type=float, default=1800, help="give up after this many seconds in one notebook cell")
    p.add_argument("--idle-timeout", type=float, default=600, help="give up after this many seconds without a metric")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.monotonic()
    run_dir = (args.runs_dir / time.strftime("%Y%m%d-%H%M%S")).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    builtin = args.data_root is None
    data_root = ensure_demo_data(REPO / "data" / "demo", args.category) if builtin else args.data_root.resolve()
    print(f"run folder {run_dir}")
    fresh = args.init == "fresh"
    lr = args.lr if args.lr is not None else (FRESH_LR if fresh else FINETUNE_LR)
    warmup = args.warmup_steps if args.warmup_steps is not None else (FRESH_WARMUP if fresh else FINETUNE_WARMUP)
    processes = Processes()
    try:
        start_from = initial_checkpoint(args.init, args.category, run_dir)
        federation = start_federation(run_dir, data_root, args.category, args.envoys, processes=processes, tls=args.tls)
        print(f"director on port {federation.port} accepted {', '.join(federation.envoys)}; running the notebook")
        params = dict(
            director_host=federation.host, director_port=federation.port, expected_envoys=args.envoys,
            category=args.category, rounds=args.rounds, repeat=args.repeat, max_steps=args.max_steps or None,
            batch_size=args.batch_size, lr=lr, warmup_steps=warmup, final_search=args.final_search,
            initial_checkpoint=None if start_from is None else str(start_from),
            idle_timeout=args.idle_timeout,
            output_dir=str(run_dir / "notebook"), local_data_root=str(data_root), **federation.tls,
        )
        run_notebook(run_dir / "PatchSVDD_with_Director.ipynb", params, args.timeout, run_dir)
    except KeyboardInterrupt:
        print("interrupted: stopping the director and envoys", file=sys.stderr)
        return 130
    except Exception as exc:  # report, keep the logs, stop everything
        print(f"demo failed: {type(exc).__name__}: {exc}\nlogs: {run_dir / 'logs'}", file=sys.stderr)
        return 1
    finally:
        processes.stop()
    print(summarise(run_dir, time.monotonic() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
