"""The one-command federated demo: data, a director and envoys (or a SuperLink and SuperNodes), the notebook, a
summary.

``python -m patchsvdd.cli.demo`` (what ``make demo`` runs) writes everything under
``runs/<time>/``: process logs, configs, the executed notebook, metrics and
pictures. The director and envoys are started through the project's start
scripts by ``openfl.local.start_federation`` (``flower.local`` on Flower); every process started is stopped on
success, failure or Ctrl-C. The settings are ``settings.DEMO_SETTINGS``.

This module starts processes; it does not import OpenFL.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from patchsvdd.cli.main import DefaultsHelp
from patchsvdd.federated.local import HarnessError, Processes, project_root
from patchsvdd.federated.openfl.local import start_federation
from patchsvdd.models.registry import model_names
from patchsvdd.settings import (
    DEMO_DATA,
    DEMO_SETTINGS,
    FINETUNE,
    HELDOUT_METRICS,
    LEARN_BUDGET,
    PRECISIONS,
    SEARCHES,
    SettingsError,
)
from patchsvdd.system.probes import free_port

NOTEBOOK = Path("workspace") / "PatchSVDD_with_Director.ipynb"
GALLERY_IMAGES = 8  # test images the notebook's gallery scores and shows (the sites' own scores are the metrics)
# The phases of the notebook, each named by a call that only its cell makes (papermill times every cell).
PHASES = (
    ("rounds", "experiment.train("),
    ("evaluation", "experiment.evaluate("),
    ("export", "experiment.export("),
    ("gallery", "plots.save_gallery("),
)


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


def detection_noise(learning: Sequence[dict], sizes: dict[str, tuple[int, int]]) -> list[str]:
    """Summary lines: the standard error each envoy's det_sum has from its test-set size alone (Hanley and
    McNeil), untrained and trained, so that a reader can tell a gain from the noise of a small test set."""
    from patchsvdd.evaluation.metrics import auroc_standard_error

    parts = []
    for row in learning:
        good, defective = sizes.get(row["node"], (0, 0))
        values = [row.get("det_sum untrained"), row.get("det_sum trained")]
        if good and defective and all(isinstance(v, (int, float)) for v in values):
            errors = " -> ".join(f"{auroc_standard_error(float(v), good, defective):.3f}" for v in values)  # type: ignore[arg-type]
            parts.append(f"{row['node']} ({good} good, {defective} defective) {errors}")
    if not parts:
        return []
    return [
        "  det_sum standard error, untrained -> trained, from the test-set size alone (Hanley-McNeil: another draw",
        "  of as many test images moves det_sum by about this much): " + "; ".join(parts),
    ]


def phase_seconds(executed: Path) -> dict[str, float]:
    """Seconds of each phase of ``PHASES`` in a notebook papermill executed (from its cells' recorded
    durations; 'other' is every other cell), so that a reader sees where the time went."""
    out: dict[str, float] = {}
    for cell in json.loads(executed.read_text())["cells"]:
        seconds = cell.get("metadata", {}).get("papermill", {}).get("duration")
        if cell["cell_type"] != "code" or seconds is None:
            continue
        source = "".join(cell["source"])
        name = next((phase for phase, call in PHASES if call in source), "other")
        out[name] = out.get(name, 0.0) + float(seconds)
    return out


def summarise(run_dir: Path, seconds: float, started: float | None = None) -> str:
    """A few lines: where results are, untrained against trained, the final metrics, the time."""
    from patchsvdd.evaluation.report import fmt, test_set_sizes, untrained_vs_trained

    results = run_dir / "notebook"
    final = json.loads((results / "metrics.json").read_text())
    network = final.get("network", "patchsvdd")
    keys = (HELDOUT_METRICS[network], "det_sum", "seg_sum")
    lines = [f"demo ({network}) finished in {seconds:.0f} s; results in {run_dir}"]
    executed = run_dir / NOTEBOOK.name
    if executed.is_file():
        phases = {**({} if started is None else {"data and start": started}), **phase_seconds(executed)}
        lines.append("  time per phase: " + ", ".join(f"{name} {value:.0f} s" for name, value in phases.items()))
    learning = untrained_vs_trained(json.loads((results / "round_metrics.json").read_text()), keys)
    lines.append("  untrained (round 0) -> trained (final round), per-round validation on each envoy's own data:")
    for row in learning:
        shown = "  ".join(f"{key} {fmt(row[f'{key} untrained'])} -> {fmt(row[f'{key} trained'])}" for key in keys)
        lines.append(f"  {row['node']:10s} {shown}")
    lines += detection_noise(learning, test_set_sizes(final.get("per_defect", {})))
    lines.append(f"  final evaluation of the {final['model']} model ({final['search']} search):")
    for node, metrics in sorted(final["per_node"].items()):
        lines.append(f"  {node:10s} " + " ".join(f"{k}={fmt(v)}" for k, v in metrics.items()))
    bundles = results / "bundles.json"
    if bundles.is_file():
        lines.append(
            "  inspection bundles written at the sites (patchsvdd predict BUNDLE IMAGES --out DIR, or serve BUNDLE):"
        )
        for row in json.loads(bundles.read_text()):
            lines.append(
                f"  {row['envoy']:10s} {row['bundle at the site']} (image threshold "
                f"{fmt(row['image_threshold'])}, {row['bundle_mb']:.1f} MB)"
            )
    local = results / "local_metrics.json"
    if local.is_file():
        metrics = json.loads(local.read_text())
        lines.append("  notebook   " + " ".join(f"{k}={fmt(v)}" for k, v in metrics.items()))
    return "\n".join(lines)


def budget_note(settings, envoys: int = 2) -> str | None:
    """A sentence when a run on the demo data trains fewer steps per envoy than ``LEARN_BUDGET``: such a first run
    shows the whole path but is too short for the model to beat the untrained encoder (it gets worse before it
    gets better)."""
    from patchsvdd.data.mvtec import holdout_split

    fitting = len(holdout_split(DEMO_DATA["n_train"] // envoys, settings.holdout_fraction)[0])  # per envoy

    def steps(s) -> int:
        return s.rounds * s.train_settings().steps_per_epoch(fitting, s.max_steps)

    learn = replace(settings, **LEARN_BUDGET)
    if settings.model != DEMO_SETTINGS.model or settings.lr != DEMO_SETTINGS.lr or steps(settings) >= steps(learn):
        return None
    return (
        f"  note: {steps(settings)} steps per envoy is a first run, too short to learn: the model gets worse before "
        f'it gets better (docs/benchmarks.md, "The demo"). make demo-learn trains the {steps(learn)} steps at '
        "which it beats the untrained encoder clearly (aggregated det_sum about +0.2)."
    )


def build_parser() -> argparse.ArgumentParser:
    """The demo's options; defaults from ``settings.DEMO_SETTINGS`` (environment variables as in the Makefile)."""
    d = DEMO_SETTINGS
    p = argparse.ArgumentParser(
        prog="python -m patchsvdd.cli.demo",
        description="Run the federated Patch SVDD demo end to end.",
        formatter_class=DefaultsHelp,
    )
    p.add_argument(
        "--data-root",
        type=Path,
        default=os.environ.get("DATA_ROOT") or None,
        help="MVTec-layout data root (None: built-in demo data in data/demo; env DATA_ROOT)",
    )
    p.add_argument("--category", default=os.environ.get("CATEGORY") or "washer", help="category (env CATEGORY)")
    p.add_argument(
        "--model",
        choices=model_names(),
        default=os.environ.get("MODEL") or d.model,
        help="patchsvdd, or autoencoder: the convolutional autoencoder baseline (env MODEL)",
    )
    p.add_argument("--envoys", type=int, default=2, help="envoys, each holding one shard of the category")
    p.add_argument(
        "--engine",
        choices=("openfl", "flower"),
        default=os.environ.get("ENGINE") or "openfl",
        help="openfl: a director and envoys; flower: a SuperLink and SuperNodes (run from the Flower "
        "environment, make flower-install; env ENGINE)",
    )
    p.add_argument(
        "--secure-aggregation",
        action="store_true",
        default=os.environ.get("SECAGG") == "1",
        help="Flower only: the sites' weights reach the notebook only as their mean, through SecAgg+ (env SECAGG=1)",
    )
    p.add_argument(
        "--learn",
        action="store_true",
        default=os.environ.get("LEARN", "0") not in ("", "0"),
        help=f"the budget at which the model clearly beats the untrained encoder ({LEARN_BUDGET['rounds']} "
        f"rounds of {LEARN_BUDGET['max_steps']} steps, repeat {LEARN_BUDGET['repeat']}; about 15 "
        "minutes with native bf16, 35 without) instead of a first run of minutes (env LEARN=1)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=_env_int("ROUNDS", None),
        help=f"training rounds (None: {d.rounds}, {LEARN_BUDGET['rounds']} with --learn; env ROUNDS)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=None,
        help=f"times each training image is used per round (None: {d.repeat} from scratch, "
        f"{FINETUNE['repeat']} when fine-tuning)",
    )
    p.add_argument(
        "--max-steps",
        type=int,
        default=_env_int("MAX_STEPS", None),
        help=f"at most this many steps per envoy per round (None: {d.max_steps} from scratch, "
        f"{FINETUNE['max_steps']} when fine-tuning; 0: full epochs; env MAX_STEPS); a round is one "
        "epoch, ceil(fitting images x repeat / batch) steps, so longer rounds need a larger --repeat too",
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="pairs per loss")
    p.add_argument(
        "--seed",
        type=int,
        default=_env_int("SEED", d.seed),
        help="seed of the initial model and of the envoys' training batches (the demo data keep seed 0; env SEED)",
    )
    p.add_argument(
        "--init",
        default=os.environ.get("INIT") or "fresh",
        help="fresh (a new model), official (the authors' released encoder of --category: downloaded once, "
        "SHA-256 checked, cached), or a checkpoint .pt or released .pkl file (env INIT)",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help=f"peak learning rate (None: {d.lr:g} from scratch, {FINETUNE['lr']:g} when fine-tuning)",
    )
    p.add_argument(
        "--warmup-steps",
        type=int,
        default=None,
        help=f"linear warm-up, then cosine decay over all rounds (None: {d.warmup_steps} from scratch, "
        f"{FINETUNE['warmup_steps']} when fine-tuning)",
    )
    p.add_argument("--final-search", choices=SEARCHES, default=d.final_search, help="search of the final evaluation")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=os.environ.get("PRECISION") or d.precision,
        help="auto: bf16 autocast where the CPU/GPU has it natively, else fp32; fp32 to measure what a "
        "CPU without native bf16 gets (env PRECISION)",
    )
    p.add_argument(
        "--tls",
        action="store_true",
        default=os.environ.get("TLS", "0") not in ("", "0"),
        help="mutual TLS between all nodes with fresh certificates (env TLS=1)",
    )
    p.add_argument("--runs-dir", type=Path, default=None, help="where run folders go (None: runs/ of the project)")
    p.add_argument(
        "--data-only",
        action="store_true",
        help="only make the built-in demo data (data/demo/<category>) if they are absent or stale, then stop",
    )
    p.add_argument("--timeout", type=float, default=3600, help="give up after this many seconds in one notebook cell")
    p.add_argument(
        "--idle-timeout", type=float, default=d.idle_timeout, help="give up after this many seconds without a metric"
    )
    return p


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
