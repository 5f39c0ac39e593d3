"""The commands that score images: ``evaluate``, ``export`` (a site bundle), ``predict``, ``serve``, ``bundle``.

Each takes the parsed arguments of ``cli.build_parser`` and returns an exit code;
heavy imports happen inside, so that bad arguments fail before any work.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from patchsvdd.cli.make_commands import load_shard
from patchsvdd.cli.options import BUNDLE, DATA, DEVICE, Command, Exclusive, at_least, bank_fraction, opt
from patchsvdd.errors import InputError

if TYPE_CHECKING:
    from patchsvdd.deploy.bundle import Bundle


def _evaluation_model(args: argparse.Namespace, category: str):
    """(model, metadata) for ``category`` from --checkpoint, --checkpoint-dir or --weights official."""
    from patchsvdd.models.patchsvdd.released import import_released
    from patchsvdd.training.checkpoint import load_checkpoint

    if args.weights == "official":
        model, meta = import_released(category)
        return model, {"imported": meta, "category": category}
    path = args.checkpoint if args.checkpoint is not None else args.checkpoint_dir / f"{category}.pt"
    return load_checkpoint(path)


def _print_defects(defects: dict, fusion: str) -> None:
    """The per-defect image-score table of one fusion, as the autoencoder pipelines print it."""
    print(f"image scores ({fusion}) per defect type:")
    print(f"  {'type':18s} {'n':>4s} {'mean':>9s} {'std':>9s} {'min':>9s} {'max':>9s} {'AUROC':>6s}")
    for name, row in defects[fusion].items():
        shown = "" if row.get("auroc") is None else f"{row['auroc']:.3f}"
        print(
            f"  {name:18s} {row['n']:4d} {row['mean']:9.4g} {row['std']:9.4g} {row['min']:9.4g} {row['max']:9.4g} "
            f"{shown:>6s}"
        )


def evaluate_one(args: argparse.Namespace, category: str, out_dir: Path) -> dict:
    """Evaluate one category into ``out_dir`` (metrics.json, roc.png, maps/); returns the report."""
    from patchsvdd.device import resolve_device
    from patchsvdd.evaluation.evaluate import evaluate_category, image_scores
    from patchsvdd.evaluation.plots import plot_roc, save_gallery
    from patchsvdd.models.registry import family_of

    device = resolve_device(args.device)
    model, meta = _evaluation_model(args, category)  # fails before the data is decoded
    model_family = family_of(model)
    if args.fusion not in model_family.fusions:
        raise InputError(
            f"--fusion {args.fusion}: the {model_family.name} model's maps are {', '.join(model_family.fusions)}"
        )
    data = load_shard(args, category)
    model.to(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = evaluate_category(model, data, mode=args.search, progress=not args.no_progress)
    seconds = {**result.seconds, "total": time.perf_counter() - start}
    report = {
        **result.metrics,
        "category": category,
        "model": model_family.name,
        "search": args.search,
        "device": str(device),
        "n_train": int(len(data.train_images)),
        "n_test": int(len(data.test_images)),
        "checkpoint": str(args.checkpoint or args.checkpoint_dir or "official"),
        "checkpoint_metadata": {k: v for k, v in meta.items() if k != "history"},
        "per_defect": result.defects,
        "seconds": seconds,
    }
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2))
    plot_roc(data.test_labels, {f: image_scores(result, f) for f in result.scores.maps}, out_dir / "roc.png")
    if not args.no_gallery:
        maps = result.scores.maps[args.fusion].numpy()
        save_gallery(out_dir / "maps", data.test_images, data.test_masks, maps, data.test_names)
    for key, value in result.metrics.items():
        print(f"{key:10s} {'n/a' if value is None else f'{value:.4f}'}")
    _print_defects(result.defects, args.fusion)
    print(f"evaluated {category} in {seconds['total']:.1f} s; wrote {out_dir / 'metrics.json'}")
    return report


def cmd_evaluate(args: argparse.Namespace) -> int:
    if args.category != "all":
        evaluate_one(args, args.category, args.out_dir)
        return 0
    from patchsvdd.evaluation.categories import CategoryResult, find_categories, write_results

    categories = find_categories(args.data_root)
    results = []
    for number, category in enumerate(categories, start=1):
        print(f"[{number}/{len(categories)}] {category}", flush=True)
        start = time.perf_counter()
        try:
            report = evaluate_one(args, category, args.out_dir / category)
            results.append(CategoryResult(category, {k: report.get(k) for k in report}, time.perf_counter() - start))
        except Exception as exc:  # one category's failure is reported in the table; the others go on
            error = f"{type(exc).__name__}: {exc}"
            print(f"[{number}/{len(categories)}] {category} failed: {error}", file=sys.stderr, flush=True)
            results.append(CategoryResult(category, seconds=time.perf_counter() - start, error=error))
    source = "--weights official" if args.weights else str(args.checkpoint or args.checkpoint_dir)
    models = sorted({str(r.metrics["model"]) for r in results if r.metrics.get("model")}) or ["no model"]
    paths = write_results(
        results, args.out_dir, f"{' / '.join(models)} on {args.data_root} ({source}, {args.search} search)"
    )
    print(paths["md"].read_text())
    failed = [r.category for r in results if r.error is not None]
    print(f"wrote {paths['md']}, {paths['csv']}, {paths['png']}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def cmd_export(args: argparse.Namespace) -> int:
    from patchsvdd.deploy.export import export_bundle
    from patchsvdd.device import resolve_device
    from patchsvdd.evaluation.plots import plot_roc_point
    from patchsvdd.evaluation.report import markdown_table
    from patchsvdd.models.patchsvdd.released import sha256_of
    from patchsvdd.training.checkpoint import load_checkpoint

    if args.max_fpr is not None and not 0 <= args.max_fpr < 1:
        raise InputError(f"--max-fpr {args.max_fpr}: must be in [0, 1)")
    model, meta = load_checkpoint(args.checkpoint)  # fails before the data is decoded
    data = load_shard(args)
    calibration = None
    if args.calibration_root is not None:
        from patchsvdd.data.mvtec import index_category, load_category

        calibration = load_category(index_category(args.calibration_root, args.category))
    model.to(resolve_device(args.device))
    start = time.perf_counter()
    info = {
        "source_checkpoint": str(args.checkpoint),
        "source_sha256": sha256_of(args.checkpoint),
        "source_metadata": {k: v for k, v in meta.items() if k != "history"},
    }
    inspector, calib = export_bundle(
        model,
        data,
        args.out,
        bank_fraction=args.bank_fraction,
        max_fpr=args.max_fpr,
        calibration=calibration,
        info=info,
        subsample=args.subsample,
    )
    image_t, pixel_t = inspector.image_threshold, inspector.pixel_threshold
    thresholds = [
        {"threshold": name, "value": t.value, "method": t.method, "FPR": t.fpr, "TPR": t.tpr, "F1": t.f1}
        for name, t in (("image", image_t), ("pixel", pixel_t))
    ]
    defects = [{"type": name, **row} for name, row in calib.defects.items()]
    lines = [
        f"# Calibration of bundle {args.out.name} ({args.category})",
        "",
        calib.note,
        "",
        markdown_table(thresholds),
        "",
        "Image scores per defect type (AUROC of each type against good):",
        "",
        markdown_table(defects, ["type", "n", "mean", "std", "min", "max", "auroc"]),
        "",
        _bank_lines(args.bank_fraction, inspector.bundle, calib.bank_choice),
    ]
    (args.out / "calibration.md").write_text("\n".join(lines) + "\n")
    plot_roc_point(calib.labels, calib.scores, image_t.fpr, image_t.tpr, args.out / "roc.png")
    print("\n".join(lines))
    print(f"wrote bundle {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


def _bank_lines(asked: float | str, bundle: Bundle, choice: list[dict]) -> str:
    """calibration.md's paragraph on the memory bank: what was asked, what each candidate measured."""
    from patchsvdd.deploy.export import AUTO_TOLERANCE
    from patchsvdd.evaluation.report import markdown_table

    info = bundle.info
    if not bundle.banks:
        return f"No memory bank: a {bundle.kind} bundle keeps none."
    rows = ", ".join(f"K={k}: {len(bank)} rows" for k, bank in bundle.banks.items())
    kept = f"Memory bank: {info.get('bank_fraction')} of the patches ({info.get('bank_subsample')}; {rows})"
    if asked != "auto":
        return f"{kept}; --bank-fraction {asked} as asked."
    if not choice:
        return f"{kept}; --bank-fraction auto keeps the full bank: no defective calibration image to measure on."
    return "\n".join(
        [
            f"{kept}: --bank-fraction auto kept the smallest k-center bank whose image and pixel AUROCs on the "
            f"calibration images are within {AUTO_TOLERANCE} of the full bank's (--bank-fraction 1 keeps all):",
            "",
            markdown_table(choice, ["fraction", "rows_32", "det_auroc", "seg_auroc", "bank_mb", "chosen"]),
        ]
    )


def cmd_bundle(args: argparse.Namespace) -> int:
    from patchsvdd.deploy.versions import history, rollback

    if args.bundle_command == "rollback":
        before, after = rollback(args.bundle)
        print(f"{args.bundle}: version {before} -> {after} (version {before} stays in {args.bundle / 'versions'})")
        return 0
    if args.bundle_command == "history":
        from patchsvdd.deploy.bundle import read_bundle

        info = read_bundle(args.bundle).info
        print(f"{args.bundle}: version {info.get('bundle_version', 1)}, written {info.get('written')}")
        for entry in history(args.bundle):
            print(
                f"  v{entry['version']} ({entry.get('when')}): {entry.get('note', entry.get('change'))}; "
                f"{entry.get('request')}; previous v{entry['previous_version']} sha256 {entry['previous_sha256'][:16]}"
            )
        return 0
    import numpy as np

    from patchsvdd.deploy.feedback import teach
    from patchsvdd.deploy.inspector import to_image
    from patchsvdd.device import resolve_device

    files = _image_files(args.images)
    images = np.stack([to_image(path) for path in files])
    names = ", ".join(p.name for p in files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
    change = teach(
        args.bundle,
        images,
        args.label,
        request=f"patchsvdd bundle {args.bundle_command}: {names}",
        device=str(resolve_device(args.device)),
    )
    print(f"{args.bundle}: version {change.version}: {change.note}; image threshold {change.threshold.value:.4g}")
    return 0


def _image_files(inputs: Sequence[Path]) -> list[Path]:
    """Every image file named or found (recursively) in the folders named, in a stable order."""
    from patchsvdd.data.mvtec import IMAGE_SUFFIXES

    files: list[Path] = []
    for item in inputs:
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif item.is_file():
            files.append(item)
        else:
            raise InputError(f"{item}: no such file or folder")
    if not files:
        raise InputError(f"no image ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(map(str, inputs))}")
    return files


def cmd_predict(args: argparse.Namespace) -> int:
    import csv

    from patchsvdd.deploy.inspector import load_bundle, to_image
    from patchsvdd.evaluation.plots import save_prediction

    files = _image_files(args.inputs)
    inspector = load_bundle(args.bundle, device=args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    pixel = inspector.pixel_threshold
    if not args.no_progress:
        from tqdm.auto import tqdm

        files_iter = tqdm(files, desc="predict")
    else:
        files_iter = files
    flagged = 0
    with open(args.out / "predictions.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "score", "normalized_score", "anomalous"])
        for number, path in enumerate(files_iter):
            image = to_image(path)
            result = inspector.inspect(image)
            flagged += result.anomalous
            writer.writerow([str(path), repr(result.score), f"{result.normalized_score:.4f}", int(result.anomalous)])
            label = "ANOMALOUS" if result.anomalous else "ok"
            save_prediction(
                args.out / f"{number:05d}_{path.stem}.png",
                image,
                result.map,
                pixel.low,
                pixel.high,
                pixel.value,
                f"{path.name}: {label} ({result.normalized_score:.2f})",
            )
    print(f"{len(files)} images, {flagged} anomalous; wrote {args.out / 'predictions.csv'} and one PNG per image")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from patchsvdd.deploy.service import serve

    serve(
        str(args.bundle),
        host=args.host,
        port=args.port,
        max_bytes=args.max_bytes,
        workers=args.workers,
        device=args.device,
        token_file=None if args.token_file is None else str(args.token_file),
        allow_feedback=args.allow_feedback,
        watch=None if args.watch is None else str(args.watch),
        recent=args.recent,
    )
    return 0


def commands() -> list[Command]:
    """The commands that score, package, serve and change bundles."""
    evaluate = Command(
        "evaluate",
        "score a category (or all) with a checkpoint; write metrics.json, maps and ROC",
        (
            *DATA,
            Exclusive(
                (
                    opt("--checkpoint", type=Path, help="one checkpoint (for every category with --category all)"),
                    opt("--checkpoint-dir", type=Path, help="a folder holding <category>.pt for each category"),
                    opt(
                        "--weights",
                        choices=("official",),
                        help="official: the authors' released encoder of each category (downloaded once, checked)",
                    ),
                ),
                required=True,
            ),
            opt(
                "--out-dir",
                required=True,
                type=Path,
                help="where metrics.json etc. go; with --category all one folder per category, and "
                "results.md, results.csv, results.png",
            ),
            opt("--search", choices=("exact", "fast"), default="exact", help="nearest-neighbour search"),
            opt(
                "--fusion",
                default="sum",
                choices=("64", "32", "sum", "mult", "l2", "ssim"),
                help="map shown in the gallery: Patch SVDD's 64, 32, sum, mult; the autoencoder's l2, ssim, sum",
            ),
            opt("--no-gallery", action="store_true", help="skip the per-image PNGs"),
        ),
        cmd_evaluate,
    )
    export = Command(
        "export",
        "make a site bundle: the model, this site's memory banks (Patch SVDD) or error scales "
        "(autoencoder), thresholds calibrated on its labelled images",
        (
            *DATA,
            opt("--checkpoint", required=True, type=Path, help="the model (e.g. a federation's last.pt)"),
            opt("--out", required=True, type=Path, help="bundle folder to write"),
            opt(
                "--bank-fraction",
                type=bank_fraction,
                default="auto",
                help="share of the training patches the memory banks keep: 'auto' (the smallest k-center bank "
                "within 0.005 AUROC of the full one on the labelled calibration images, measured and written to "
                "calibration.md; the full bank without defective images), or a number in (0, 1]; 1 keeps all",
            ),
            opt(
                "--subsample",
                choices=("kcenter", "random"),
                default="kcenter",
                help="how --bank-fraction picks patches: kcenter (covering, per grid position; default) or random",
            ),
            opt(
                "--max-fpr",
                type=float,
                default=None,
                help="image threshold at this false-positive rate on good images (default: at maximum F1)",
            ),
            opt(
                "--calibration-root",
                type=Path,
                default=None,
                help="a data root whose <category>/test calibrates the thresholds (default: --data-root's)",
            ),
        ),
        cmd_export,
    )
    predict = Command(
        "predict",
        "inspect images with a bundle: a CSV of decisions and one PNG per image",
        (
            BUNDLE,
            opt("inputs", nargs="+", type=Path, help="image files or folders (searched recursively)"),
            opt("--out", required=True, type=Path, help="folder for predictions.csv and the PNGs"),
            DEVICE,
            opt("--no-progress", action="store_true", help="no progress bar"),
        ),
        cmd_predict,
    )
    serve = Command(
        "serve",
        "serve a bundle over HTTP: POST /infer, GET /health, GET /info (FastAPI)",
        (
            BUNDLE,
            opt("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)"),
            opt("--port", type=at_least(1, 65535), default=8080, help="port to listen on"),
            opt("--max-bytes", type=at_least(1), default=20 * 1024 * 1024, help="largest request accepted, in bytes"),
            opt("--workers", type=at_least(1), default=2, help="requests scored at once"),
            DEVICE,
            opt(
                "--token-file",
                type=Path,
                default=None,
                help="a file whose first line is a token (16+ characters): every endpoint but /health and the page "
                "then needs 'Authorization: Bearer <token>'",
            ),
            opt(
                "--allow-feedback",
                action="store_true",
                help="accept POST /feedback (needs --token-file): good images join the memory bank, defective ones "
                "recalibrate the threshold; each change is a new bundle version",
            ),
            opt("--watch", type=Path, default=None, help="a camera folder: inspect each new image in it"),
            opt("--recent", type=at_least(1), default=24, help="decisions the page lists (kept in memory)"),
        ),
        cmd_serve,
    )
    adders = tuple(
        Command(
            f"add-{label}",
            f"teach the bundle that these images are {label} "
            + (
                "(their patches join the memory bank; no training)"
                if label == "good"
                else "(kept for calibration; the threshold is chosen again)"
            ),
            (BUNDLE, opt("images", nargs="+", type=Path, help="image files or folders (searched recursively)"), DEVICE),
            defaults={"label": label},
        )
        for label in ("good", "defective")
    )
    folder = opt("bundle", type=Path, help="bundle folder")
    bundle = Command(
        "bundle",
        "change a site bundle: add confirmed good or defective images, roll back, show its history",
        run=cmd_bundle,
        subcommands=(
            *adders,
            Command("rollback", "return to the bundle's previous version", (folder,)),
            Command("history", "list the bundle's versions since export", (folder,)),
        ),
        dest="bundle_command",
    )
    return [evaluate, export, predict, serve, bundle]
