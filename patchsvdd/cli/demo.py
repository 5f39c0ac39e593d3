"""The one-command federated demo: data, a director and envoys (or a SuperLink and SuperNodes), the notebook, a
summary (``demo_summary``).

``python -m patchsvdd.cli.demo`` (what ``make demo`` runs) writes everything under
``runs/<time>/``: process logs, configs, the executed notebook, metrics and
pictures. The director and envoys are started through the project's start
scripts by ``openfl.local.start_federation`` (``flower.local`` on Flower); every process started is stopped on
success, failure or Ctrl-C. The settings are ``settings.DEMO_SETTINGS``.

This module starts processes; it does not import OpenFL.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from patchsvdd.cli.demo_summary import NOTEBOOK, budget_note, summarise
from patchsvdd.cli.options import DefaultsHelp, Option, add_options, opt
from patchsvdd.federated.local import HarnessError, Processes, project_root
from patchsvdd.federated.openfl.local import start_federation
from patchsvdd.models.registry import model_names
from patchsvdd.settings import (
    DEMO_DATA,
    DEMO_SETTINGS,
    FINETUNE,
    LEARN_BUDGET,
    PRECISIONS,
    SEARCHES,
    SettingsError,
)
from patchsvdd.system.probes import free_port

GALLERY_IMAGES = 8  # test images the notebook's gallery scores and shows (the sites' own scores are the metrics)


def _env_int(name: str, default: int | None) -> int | None:
    """An integer from environment variable ``name`` (unset or empty: ``default``); a clear error otherwise."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"{name}={value!r}: expected a whole number") from None


def run_notebook(notebook: Path, output: Path, parameters: dict, timeout: float, cwd: Path) -> None:
    """Execute ``notebook`` headless with papermill; the executed copy is ``output``."""
    import papermill

    papermill.execute_notebook(
        str(notebook),
        str(output),
        parameters=parameters,
        cwd=str(cwd),
        kernel_name="python3",
        execution_timeout=int(timeout),
        progress_bar=False,
        log_output=False,
        stdout_file=sys.stdout,
    )


def ensure_demo_data(data_root: Path, category: str) -> Path:
    """Generate the built-in demo category under ``data_root`` (``settings.DEMO_DATA``) unless this synth
    version already wrote it with those arguments."""
    import shutil

    from patchsvdd.data.synth import SYNTH_VERSION, generate_category, generated_with

    folder = data_root / category
    if generated_with(folder) != {"version": SYNTH_VERSION, **DEMO_DATA}:
        if folder.exists():
            shutil.rmtree(folder)
        print(f"generating demo data {folder}")
        generate_category(data_root, category, **DEMO_DATA)
    return data_root


def initial_checkpoint(init: str, category: str, run_dir: Path) -> Path | None:
    """The checkpoint the federation starts from: None for 'fresh'; the released encoder of ``category``
    ('official' or a released .pkl file) imported into ``run_dir``; or a project checkpoint as given."""
    if init == "fresh":
        return None
    from patchsvdd.models.patchsvdd.released import import_released
    from patchsvdd.training.checkpoint import load_checkpoint, save_checkpoint

    path = Path(init)
    if init != "official" and path.suffix == ".pt":
        load_checkpoint(path)  # a bad file fails here, before any process starts
        return path.resolve()
    model, meta = import_released(category, None if init == "official" else path)
    out = run_dir / "initial.pt"
    save_checkpoint(model, out, imported=meta, category=category)
    print(f"starting from the released {category} encoder ({meta['file']}, SHA-256 {meta['sha256'][:12]}...)")
    return out


def demo_options() -> tuple[Option, ...]:
    """The demo's options as a table; defaults from ``settings.DEMO_SETTINGS`` (environment variables as in the
    Makefile)."""
    d = DEMO_SETTINGS
    return (
        opt(
            "--data-root",
            type=Path,
            default=os.environ.get("DATA_ROOT") or None,
            help="MVTec-layout data root (None: built-in demo data in data/demo; env DATA_ROOT)",
        ),
        opt("--category", default=os.environ.get("CATEGORY") or "washer", help="category (env CATEGORY)"),
        opt(
            "--model",
            choices=model_names(),
            default=os.environ.get("MODEL") or d.model,
            help="patchsvdd, or autoencoder: the convolutional autoencoder baseline (env MODEL)",
        ),
        opt("--envoys", type=int, default=2, help="envoys, each holding one shard of the category"),
        opt(
            "--engine",
            choices=("openfl", "flower"),
            default=os.environ.get("ENGINE") or "openfl",
            help="openfl: a director and envoys; flower: a SuperLink and SuperNodes (run from the Flower "
            "environment, make flower-install; env ENGINE)",
        ),
        opt(
            "--secure-aggregation",
            action="store_true",
            default=os.environ.get("SECAGG") == "1",
            help="Flower only: the sites' weights reach the notebook only as their mean, through SecAgg+ "
            "(env SECAGG=1)",
        ),
        opt(
            "--learn",
            action="store_true",
            default=os.environ.get("LEARN", "0") not in ("", "0"),
            help=f"the budget at which the model clearly beats the untrained encoder ({LEARN_BUDGET['rounds']} "
            f"rounds of {LEARN_BUDGET['max_steps']} steps, repeat {LEARN_BUDGET['repeat']}; about 15 "
            "minutes with native bf16, 35 without) instead of a first run of minutes (env LEARN=1)",
        ),
        opt(
            "--rounds",
            type=int,
            default=_env_int("ROUNDS", None),
            help=f"training rounds (None: {d.rounds}, {LEARN_BUDGET['rounds']} with --learn; env ROUNDS)",
        ),
        opt(
            "--repeat",
            type=int,
            default=None,
            help=f"times each training image is used per round (None: {d.repeat} from scratch, "
            f"{FINETUNE['repeat']} when fine-tuning)",
        ),
        opt(
            "--max-steps",
            type=int,
            default=_env_int("MAX_STEPS", None),
            help=f"at most this many steps per envoy per round (None: {d.max_steps} from scratch, "
            f"{FINETUNE['max_steps']} when fine-tuning; 0: full epochs; env MAX_STEPS); a round is one "
            "epoch, ceil(fitting images x repeat / batch) steps, so longer rounds need a larger --repeat too",
        ),
        opt("--batch-size", type=int, default=d.batch_size, help="pairs per loss"),
        opt(
            "--seed",
            type=int,
            default=_env_int("SEED", d.seed),
            help="seed of the initial model and of the envoys' training batches (the demo data keep seed 0; env SEED)",
        ),
        opt(
            "--init",
            default=os.environ.get("INIT") or "fresh",
            help="fresh (a new model), official (the authors' released encoder of --category: downloaded once, "
            "SHA-256 checked, cached), or a checkpoint .pt or released .pkl file (env INIT)",
        ),
        opt(
            "--lr",
            type=float,
            default=None,
            help=f"peak learning rate (None: {d.lr:g} from scratch, {FINETUNE['lr']:g} when fine-tuning)",
        ),
        opt(
            "--warmup-steps",
            type=int,
            default=None,
            help=f"linear warm-up, then cosine decay over all rounds (None: {d.warmup_steps} from scratch, "
            f"{FINETUNE['warmup_steps']} when fine-tuning)",
        ),
        opt("--final-search", choices=SEARCHES, default=d.final_search, help="search of the final evaluation"),
        opt(
            "--precision",
            choices=PRECISIONS,
            default=os.environ.get("PRECISION") or d.precision,
            help="auto: bf16 autocast where the CPU/GPU has it natively, else fp32; fp32 to measure what a "
            "CPU without native bf16 gets (env PRECISION)",
        ),
        opt(
            "--tls",
            action="store_true",
            default=os.environ.get("TLS", "0") not in ("", "0"),
            help="mutual TLS between all nodes with fresh certificates (env TLS=1)",
        ),
        opt("--runs-dir", type=Path, default=None, help="where run folders go (None: runs/ of the project)"),
        opt(
            "--data-only",
            action="store_true",
            help="only make the built-in demo data (data/demo/<category>) if they are absent or stale, then stop",
        ),
        opt("--timeout", type=float, default=3600, help="give up after this many seconds in one notebook cell"),
        opt(
            "--idle-timeout",
            type=float,
            default=d.idle_timeout,
            help="give up after this many seconds without a metric",
        ),
    )


def build_parser() -> argparse.ArgumentParser:
    """The demo's command line (``demo_options``)."""
    parser = argparse.ArgumentParser(
        prog="python -m patchsvdd.cli.demo",
        description="Run the federated Patch SVDD demo end to end.",
        formatter_class=DefaultsHelp,
    )
    add_options(parser, demo_options())
    return parser


def demo_settings(args: argparse.Namespace):
    """``DEMO_SETTINGS`` with the options put in (fine-tuning defaults when ``--init`` is not 'fresh');
    ValueError with the setting's name for a value out of range."""
    tuned = dict(FINETUNE) if args.init != "fresh" else dict(LEARN_BUDGET) if args.learn else {}
    chosen = dict(
        model=args.model,
        batch_size=args.batch_size,
        seed=args.seed,
        precision=args.precision,
        final_search=args.final_search,
        idle_timeout=args.idle_timeout,
        secure_aggregation=args.secure_aggregation,
        **tuned,
    )
    given = (
        ("lr", args.lr),
        ("warmup_steps", args.warmup_steps),
        ("repeat", args.repeat),
        ("max_steps", args.max_steps),
        ("rounds", args.rounds),
    )
    chosen.update({k: v for k, v in given if v is not None})
    if chosen.get("max_steps") == 0:
        chosen["max_steps"] = None  # full epochs
    if args.envoys < 1:
        raise SettingsError(f"envoys={args.envoys}: at least one")
    if args.secure_aggregation and args.engine != "flower":
        raise SettingsError("secure aggregation runs on Flower only: ENGINE=flower SECAGG=1 make demo")
    return replace(DEMO_SETTINGS, **chosen)


def start_engine(
    args: argparse.Namespace, run_dir: Path, data_root: Path, root: Path, processes: Processes
) -> dict[str, Any]:
    """Start the federation ``args.engine`` names on this machine; the notebook's parameters to reach it."""
    if args.engine == "flower":
        from patchsvdd.federated.flower.local import start_flower_federation

        flower = start_flower_federation(
            run_dir, data_root, args.category, args.envoys, processes=processes, tls=args.tls, root=root
        )
        link = flower.superlink
        host, _, port = link.address.rpartition(":")
        print(f"SuperLink at {link.address} admitted {', '.join(flower.sites)}; running the notebook")
        certificates = None if link.root_certificates is None else str(link.root_certificates)
        shown = link.client_certificate or (None, None)
        return dict(
            engine_name="flower",
            director_host=host,
            director_port=int(port),
            superexec_secret=str(link.secret_file),
            tls=not link.insecure,
            cert_chain=certificates,
            api_cert=None if shown[0] is None else str(shown[0]),
            api_private_key=None if shown[1] is None else str(shown[1]),
        )
    federation = start_federation(
        run_dir, data_root, args.category, args.envoys, processes=processes, tls=args.tls, root=root
    )
    print(f"director on port {federation.port} lists {', '.join(federation.envoys)} online; running the notebook")
    return dict(director_host=federation.host, director_port=federation.port, **federation.tls)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = demo_settings(args)
        root = project_root()
    except (SettingsError, HarnessError) as exc:
        parser.error(str(exc))
    if args.data_only:
        folder = ensure_demo_data(root / "data" / "demo", args.category) / args.category
        print(f"demo data in {folder}")
        return 0
    start = time.monotonic()
    run_dir = ((args.runs_dir or root / "runs") / time.strftime("%Y%m%d-%H%M%S")).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    builtin = args.data_root is None
    data_root = ensure_demo_data(root / "data" / "demo", args.category) if builtin else args.data_root.resolve()
    print(f"run folder {run_dir}")
    processes = Processes()
    try:
        start_from = initial_checkpoint(args.init, args.category, run_dir)
        connection = start_engine(args, run_dir, data_root, root, processes)
        started = time.monotonic() - start
        params = dict(
            # every setting, as one dict: the notebook puts it over its parameter cell's values
            settings_overrides=replace(settings, aggregator_port=free_port()).to_dict(),  # ports free on this machine
            expected_envoys=args.envoys,
            category=args.category,
            initial_checkpoint=None if start_from is None else str(start_from),
            output_dir=str(run_dir / "notebook"),
            local_data_root=str(data_root),
            gallery_images=GALLERY_IMAGES,
            **connection,
        )
        run_notebook(root / NOTEBOOK, run_dir / NOTEBOOK.name, params, args.timeout, run_dir)
    except KeyboardInterrupt:
        print("interrupted: stopping the director and envoys", file=sys.stderr)
        return 130
    except Exception as exc:  # report, keep the logs, stop everything
        print(f"demo failed: {type(exc).__name__}: {exc}\nlogs: {run_dir / 'logs'}", file=sys.stderr)
        return 1
    finally:
        processes.stop()
    print(summarise(run_dir, time.monotonic() - start, started))
    note = budget_note(settings, args.envoys) if builtin else None
    if note:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
