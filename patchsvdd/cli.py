"""Command line: ``patchsvdd synth | train | evaluate | export | predict | serve | import-weights | certs``.

Heavy imports happen inside each command so that ``patchsvdd --help`` and
``patchsvdd synth`` start quickly and bad arguments fail before any work.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence



def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", required=True, type=Path, help="folder holding <category>/ in the MVTec AD layout")
    p.add_argument("--category", required=True, help="category folder name, e.g. bottle (evaluate: or 'all')")
    p.add_argument("--rank-worldsize", default="1,1", help="use only shard RANK of WORLD_SIZE, e.g. 1,2 (default: all data)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    from .model import INIT_SCHEMES
    from .synth import CATEGORIES
    from .train import PRECISIONS, RECIPES, SCHEDULES

    parser = argparse.ArgumentParser(prog="patchsvdd", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    synth = sub.add_parser("synth", help="write a procedural demo category in the MVTec AD layout")
    synth.add_argument("--out", required=True, type=Path, help="data root to write <category>/ into")
    synth.add_argument("--category", default="fabric", choices=sorted(CATEGORIES))
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--n-train", type=int, default=60)
    synth.add_argument("--n-test-good", type=int, default=40)
    synth.add_argument("--n-test-per-defect", type=int, default=20)
    synth.add_argument("--image-size", type=int, default=320, help="side in pixels (>= 256; the reader resizes to 256)")

    train = sub.add_parser("train", help="train Patch SVDD on one category locally (also the centralised baseline)")
    _add_data_args(train)
    train.add_argument("--epochs", type=int, required=True)
    train.add_argument("--out", required=True, type=Path, help="checkpoint file to write")
    train.add_argument("--recipe", choices=sorted(RECIPES), default="cpu",
                       help="defaults of the settings below: cpu (He init, lr 1e-3, warm-up, cosine, bf16 where fast; "
                            "measured to learn on a CPU) or paper (PyTorch init, constant lr 1e-4, fp32) (default: cpu)")
    train.add_argument("--repeat", type=int, help="times each image is used per epoch (default 100)")
    train.add_argument("--max-steps", type=int, default=None, help="cut each epoch to at most this many steps")
    train.add_argument("--batch-size", type=int, help="pairs per loss (default 64)")
    train.add_argument("--lr", type=float, help="peak learning rate")
    train.add_argument("--lambda-svdd", type=float, help="weight of the SVDD loss (default 1e-3)")
    train.add_argument("--warmup-steps", type=int, help="linear learning-rate warm-up")
    train.add_argument("--schedule", choices=SCHEDULES, help="after the warm-up: cosine decay to lr/10, or constant")
    train.add_argument("--precision", choices=PRECISIONS, help="auto: bf16 autocast where the GPU/CPU has it, else fp32")
    train.add_argument("--init", choices=INIT_SCHEMES, help="weight initialisation of a fresh model")
    train.add_argument("--emb-dim", type=int, default=64, help="D (default 64)")
    train.add_argument("--seed", type=int, default=0)

    ev = sub.add_parser("evaluate", help="score a category (or all) with a checkpoint; write metrics.json, maps and ROC")
    _add_data_args(ev)
    weights = ev.add_mutually_exclusive_group(required=True)
    weights.add_argument("--checkpoint", type=Path, help="one checkpoint (for every category with --category all)")
    weights.add_argument("--checkpoint-dir", type=Path, help="a folder holding <category>.pt for each category")
    weights.add_argument("--weights", choices=("official",),
                         help="official: the authors' released encoder of each category (downloaded once, checked)")
    ev.add_argument("--out-dir", required=True, type=Path,
                    help="where metrics.json etc. go; with --category all one folder per category, and "
                         "results.md, results.csv, results.png")
    ev.add_argument("--search", choices=("exact", "fast"), default="exact", help="nearest-neighbour search")
    ev.add_argument("--fusion", default="sum", choices=("64", "32", "sum", "mult"), help="map shown in the gallery")
    ev.add_argument("--no-gallery", action="store_true", help="skip the per-image PNGs")

    export = sub.add_parser("export", help="make a site bundle: the model, this site's mean and memory banks, "
                                           "thresholds calibrated on its labelled images")
    _add_data_args(export)
    export.add_argument("--checkpoint", required=True, type=Path, help="the model (e.g. a federation's last.pt)")
    export.add_argument("--out", required=True, type=Path, help="bundle folder to write")
    export.add_argument("--bank-fraction", type=float, default=1.0,
                        help="keep this random share of the training patches in the memory banks (default 1: all)")
    export.add_argument("--subsample", choices=("kcenter", "random"), default="kcenter",
                        help="how --bank-fraction picks patches: kcenter (covering, per grid position; default) or random")
    export.add_argument("--max-fpr", type=float, default=None,
                        help="image threshold at this false-positive rate on good images (default: at maximum F1)")
    export.add_argument("--calibration-root", type=Path, default=None,
                        help="a data root whose <category>/test calibrates the thresholds (default: --data-root's)")

    predict = sub.add_parser("predict", help="inspect images with a bundle: a CSV of decisions and one PNG per image")
    predict.add_argument("bundle", type=Path, help="bundle folder written by 'patchsvdd export'")
    predict.add_argument("inputs", nargs="+", type=Path, help="image files or folders (searched recursively)")
    predict.add_argument("--out", required=True, type=Path, help="folder for predictions.csv and the PNGs")
    predict.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    predict.add_argument("--no-progress", action="store_true", help="no progress bar")

    serve = sub.add_parser("serve", help="serve a bundle over HTTP: POST /infer, GET /health, GET /info (FastAPI)")
    serve.add_argument("bundle", type=Path, help="bundle folder written by 'patchsvdd export'")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--max-bytes", type=int, default=20 * 1024 * 1024, help="largest request accepted (default 20 MB)")
    serve.add_argument("--workers", type=int, default=2, help="requests scored at once (default 2)")
    serve.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")

    weights = sub.add_parser("import-weights", help="import the authors' released encoder of a category as a checkpoint")
    weights.add_argument("--category", required=True, help="an MVTec AD category, e.g. bottle")
    weights.add_argument("--source", help="the released enchier.pkl: a file or URL (default: downloaded once from the "
                                          "original repository at a pinned commit, SHA-256 checked, cached)")
    weights.add_argument("--out", required=True, type=Path, help="checkpoint file to write")

    certs = sub.add_parser("certs", help="create a root authority and mutual-TLS certificates for every node (offline)")
    certs.add_argument("--out", required=True, type=Path, help="folder for root_ca.* and one .crt/.key per node")
    certs.add_argument("--director-host", action="append", help="name(s) the others use to reach the director (default localhost)")
    certs.add_argument("--envoy", action="append", required=True, help="envoy name (its certificate's common name); repeat")
    certs.add_argument("--client", action="append", help="notebook client id (default frontend); repeat")
    certs.add_argument("--days", type=int, default=365)
    return parser


def _load(args: argparse.Namespace, category: str | None = None):
    """The shard of ``category`` (default --category) that --rank-worldsize names, decoded."""
    from .data import index_category, load_category, parse_rank_worldsize

    rank, world = parse_rank_worldsize(args.rank_worldsize)
    index = index_category(args.data_root, category or args.category).shard(rank, world)
    return load_category(index, progress=not args.no_progress)


def cmd_synth(args: argparse.Namespace) -> int:
    from .synth import generate_category

    path = generate_category(
        args.out, args.category, args.seed, args.n_train, args.n_test_good, args.n_test_per_defect, args.image_size
    )
    print(f"wrote {path}")
    return 0


def train_settings(args: argparse.Namespace):
    """The recipe named by ``--recipe`` with every setting given on the command line put in."""
    from dataclasses import replace

    from .train import RECIPES

    chosen = {name: getattr(args, name) for name in ("lr", "lambda_svdd", "batch_size", "repeat", "warmup_steps",
                                                     "schedule", "precision", "init") if getattr(args, name) is not None}
    return replace(RECIPES[args.recipe], **chosen)


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import save_checkpoint
    from .data import standardise
    from .device import resolve_device
    from .model import PatchSVDD
    from .train import make_optimizer, train_epoch

    settings = train_settings(args)
    if args.epochs < 0 or (args.max_steps is not None and args.max_steps < 1):
        raise ValueError(f"--epochs {args.epochs}, --max-steps {args.max_steps}: epochs at least 0 (0 saves the "
                         "initialised model), max-steps at least 1")
    device = resolve_device(args.device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    data = _load(args)
    torch.manual_seed(args.seed)
    model = PatchSVDD(emb_dim=args.emb_dim, init=settings.init).to(device)
    optimizer = make_optimizer(model, settings.lr)
    images = standardise(data.train_images, data.mean)
    steps_per_epoch = settings.steps_per_epoch(len(images), args.max_steps)
    schedule = settings.lr_schedule(args.epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(args.seed)
    print(f"training on {len(images)} images of {args.category} on {device}: {args.epochs} x {steps_per_epoch} steps, "
          f"recipe {args.recipe} ({settings})")
    history = []
    start = time.perf_counter()
    for epoch in range(args.epochs):
        losses = train_epoch(
            model, images, optimizer, repeat=settings.repeat, batch_size=settings.batch_size,
            lambda_svdd=settings.lambda_svdd, max_steps=args.max_steps, generator=generator, schedule=schedule,
            start_step=epoch * steps_per_epoch, precision=settings.precision, progress=not args.no_progress,
        )
        history.append(losses)
        print(f"epoch {epoch + 1}/{args.epochs}: loss {losses['loss']:.4f}, position losses K=64 "
              f"{losses['loss_pos_64']:.3f} K=32 {losses['loss_pos_32']:.3f} (chance 2.079), spread "
              f"{losses['spread_64']:.2g}/{losses['spread_32']:.2g} ({int(losses['steps'])} steps)")
    save_checkpoint(
        model, args.out, category=args.category, epochs=args.epochs, recipe=args.recipe, seed=args.seed,
        settings=asdict(settings), history=history, train_seconds=time.perf_counter() - start,
    )
    print(f"saved {args.out}")
    return 0


def _evaluation_model(args: argparse.Namespace, category: str):
    """(model, metadata) for ``category`` from --checkpoint, --checkpoint-dir or --weights official."""
    from .checkpoint import load_checkpoint
    from .released import import_released

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
        print(f"  {name:18s} {row['n']:4d} {row['mean']:9.4g} {row['std']:9.4g} {row['min']:9.4g} {row['max']:9.4g} "
              f"{shown:>6s}")


def evaluate_one(args: argparse.Namespace, category: str, out_dir: Path) -> dict:
    """Evaluate one category into ``out_dir`` (metrics.json, roc.png, maps/); returns the report."""
    from .device import resolve_device
    from .evaluate import evaluate_category, image_scores
    from .viz import plot_roc, save_gallery

    device = resolve_device(args.device)
    model, meta = _evaluation_model(args, category)  # fails before the data is decoded
    data = _load(args, category)
    model.to(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = evaluate_category(model, data, mode=args.search, progress=not args.no_progress)
    seconds = {**result.seconds, "total": time.perf_counter() - start}
    report = {
        **result.metrics,
        "category": category,
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
    from .results import CategoryResult, find_categories, write_results

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
    paths = write_results(results, args.out_dir, f"Patch SVDD on {args.data_root} ({source}, {args.search} search)")
    print(paths["md"].read_text())
    failed = [r.category for r in results if r.error is not None]
    print(f"wrote {paths['md']}, {paths['csv']}, {paths['png']}"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def cmd_export(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint
    from .device import resolve_device
    from .inspector import export_bundle
    from .released import sha256_of
    from .report import markdown_table
    from .viz import plot_roc_point

    if not 0 < args.bank_fraction <= 1 or (args.max_fpr is not None and not 0 <= args.max_fpr < 1):
        raise ValueError(f"--bank-fraction {args.bank_fraction}, --max-fpr {args.max_fpr}: fraction in (0, 1], "
                         "max-fpr in [0, 1)")
    model, meta = load_checkpoint(args.checkpoint)  # fails before the data is decoded
    data = _load(args)
    calibration = None
    if args.calibration_root is not None:
        from .data import index_category, load_category

        calibration = load_category(index_category(args.calibration_root, args.category))
    model.to(resolve_device(args.device))
    start = time.perf_counter()
    info = {"source_checkpoint": str(args.checkpoint), "source_sha256": sha256_of(args.checkpoint),
            "source_metadata": {k: v for k, v in meta.items() if k != "history"}}
    inspector, calib = export_bundle(model, data, args.out, bank_fraction=args.bank_fraction, max_fpr=args.max_fpr,
                                     calibration=calibration, info=info, subsample=args.subsample)
    image_t, pixel_t = inspector.image_threshold, inspector.pixel_threshold
    thresholds = [{"threshold": name, "value": t.value, "method": t.method, "FPR": t.fpr, "TPR": t.tpr, "F1": t.f1}
                  for name, t in (("image", image_t), ("pixel", pixel_t))]
    defects = [{"type": name, **row} for name, row in calib.defects.items()]
    lines = [f"# Calibration of bundle {args.out.name} ({args.category})", "", calib.note, "",
             markdown_table(thresholds), "", "Image scores per defect type (AUROC of each type against good):", "",
             markdown_table(defects, ["type", "n", "mean", "std", "min", "max", "auroc"])]
    (args.out / "calibration.md").write_text("\n".join(lines) + "\n")
    plot_roc_point(calib.labels, calib.scores, image_t.fpr, image_t.tpr, args.out / "roc.png")
    print("\n".join(lines))
    print(f"wrote bundle {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


def _image_files(inputs: Sequence[Path]) -> list[Path]:
    """Every image file named or found (recursively) in the folders named, in a stable order."""
    from .data import IMAGE_SUFFIXES

    files: list[Path] = []
    for item in inputs:
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif item.is_file():
            files.append(item)
        else:
            raise ValueError(f"{item}: no such file or folder")
    if not files:
        raise ValueError(f"no image ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(map(str, inputs))}")
    return files


def cmd_predict(args: argparse.Namespace) -> int:
    import csv

    from .inspector import load_bundle, to_image
    from .viz import save_prediction

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
            save_prediction(args.out / f"{number:05d}_{path.stem}.png", image, result.map, pixel.low, pixel.high,
                            pixel.value, f"{path.name}: {label} ({result.normalized_score:.2f})")
    print(f"{len(files)} images, {flagged} anomalous; wrote {args.out / 'predictions.csv'} and one PNG per image")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import serve

    if args.max_bytes < 1 or args.workers < 1 or not 0 < args.port < 65536:
        raise ValueError(f"--max-bytes {args.max_bytes}, --workers {args.workers}, --port {args.port}: "
                         "bytes and workers at least 1, port 1-65535")
    serve(str(args.bundle), host=args.host, port=args.port, max_bytes=args.max_bytes, workers=args.workers,
          device=args.device)
    return 0


def cmd_import_weights(args: argparse.Namespace) -> int:
    from .checkpoint import save_checkpoint
    from .released import import_released

    model, meta = import_released(args.category, args.source)
    if not meta["pinned"]:
        print(f"warning: {meta['file']} is not the released file of {args.category} (SHA-256 {meta['sha256']})",
              file=sys.stderr)
    save_checkpoint(model, args.out, imported=meta, category=args.category)
    print(f"imported {meta['file']} (SHA-256 {meta['sha256'][:16]}...) -> {args.out}; "
          "position classifiers freshly initialised")
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    from .certs import create_federation_certs

    out = create_federation_certs(args.out, args.director_host or ["localhost"], args.envoy, args.client or ["frontend"], args.days)
    for path in sorted(out.glob("*.crt")):
        print(f"wrote {path} and {path.with_suffix('.key')}")
    print(f"keep {out / 'root_ca.key'} off the nodes; give every node {out / 'root_ca.crt'} and its own .crt/.key")
    return 0


COMMANDS = {"synth": cmd_synth, "train": cmd_train, "evaluate": cmd_evaluate, "export": cmd_export,
            "predict": cmd_predict, "serve": cmd_serve, "import-weights": cmd_import_weights, "certs": cmd_certs}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ValueError as exc:  # MVTecDataError, CheckpointError and bad settings: a message, no traceback
        print(f"patchsvdd {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
