"""Command line: ``patchsvdd synth | train | evaluate | certs``.

Heavy imports happen inside each command so that ``patchsvdd --help`` and
``patchsvdd synth`` start quickly and bad arguments fail before any work.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence



def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", required=True, type=Path, help="folder holding <category>/ in the MVTec AD layout")
    p.add_argument("--category", required=True, help="category folder name, e.g. bottle")
    p.add_argument("--rank-worldsize", default="1,1", help="use only shard RANK of WORLD_SIZE, e.g. 1,2 (default: all data)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    from .synth import CATEGORIES
    from .train import TrainSettings

    parser = argparse.ArgumentParser(prog="patchsvdd", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    synth = sub.add_parser("synth", help="write a procedural demo category in the MVTec AD layout")
    synth.add_argument("--out", required=True, type=Path, help="data root to write <category>/ into")
    synth.add_argument("--category", default="fabric", choices=sorted(CATEGORIES))
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--n-train", type=int, default=60)
    synth.add_argument("--n-test-good", type=int, default=12)
    synth.add_argument("--n-test-per-defect", type=int, default=6)
    synth.add_argument("--image-size", type=int, default=320, help="side in pixels (>= 256; the reader resizes to 256)")

    train = sub.add_parser("train", help="train Patch SVDD on one category locally (also the centralised baseline)")
    _add_data_args(train)
    train.add_argument("--epochs", type=int, required=True)
    train.add_argument("--out", required=True, type=Path, help="checkpoint file to write")
    train.add_argument("--repeat", type=int, default=TrainSettings.repeat, help="times each image is used per epoch")
    train.add_argument("--max-steps", type=int, default=None, help="cut each epoch to at most this many steps")
    train.add_argument("--batch-size", type=int, default=TrainSettings.batch_size)
    train.add_argument("--lr", type=float, default=TrainSettings.lr)
    train.add_argument("--lambda-svdd", type=float, default=TrainSettings.lambda_svdd)
    train.add_argument("--emb-dim", type=int, default=64)
    train.add_argument("--seed", type=int, default=0)

    ev = sub.add_parser("evaluate", help="score a category with a checkpoint; write metrics.json, maps and ROC")
    _add_data_args(ev)
    ev.add_argument("--checkpoint", required=True, type=Path)
    ev.add_argument("--out-dir", required=True, type=Path)
    ev.add_argument("--search", choices=("exact", "fast"), default="exact", help="nearest-neighbour search")
    ev.add_argument("--fusion", default="sum", choices=("64", "32", "sum", "mult"), help="map shown in the gallery")
    ev.add_argument("--no-gallery", action="store_true", help="skip the per-image PNGs")

    certs = sub.add_parser("certs", help="create a root authority and mutual-TLS certificates for every node (offline)")
    certs.add_argument("--out", required=True, type=Path, help="folder for root_ca.* and one .crt/.key per node")
    certs.add_argument("--director-host", action="append", help="name(s) the others use to reach the director (default localhost)")
    certs.add_argument("--envoy", action="append", required=True, help="envoy name (its certificate's common name); repeat")
    certs.add_argument("--client", action="append", help="notebook client id (default frontend); repeat")
    certs.add_argument("--days", type=int, default=365)
    return parser


def _load(args: argparse.Namespace):
    from .data import index_category, load_category, parse_rank_worldsize

    rank, world = parse_rank_worldsize(args.rank_worldsize)
    index = index_category(args.data_root, args.category).shard(rank, world)
    return load_category(index, progress=not args.no_progress)


def cmd_synth(args: argparse.Namespace) -> int:
    from .synth import generate_category

    path = generate_category(
        args.out, args.category, args.seed, args.n_train, args.n_test_good, args.n_test_per_defect, args.image_size
    )
    print(f"wrote {path}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import save_checkpoint
    from .data import standardise
    from .device import resolve_device
    from .model import PatchSVDD
    from .train import make_optimizer, train_epoch

    device = resolve_device(args.device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    data = _load(args)
    torch.manual_seed(args.seed)
    model = PatchSVDD(emb_dim=args.emb_dim).to(device)
    optimizer = make_optimizer(model, args.lr)
    images = standardise(data.train_images, data.mean)
    generator = torch.Generator().manual_seed(args.seed)
    print(f"training on {len(images)} images of {args.category} on {device}")
    history = []
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        losses = train_epoch(
            model, images, optimizer, repeat=args.repeat, batch_size=args.batch_size, lambda_svdd=args.lambda_svdd,
            max_steps=args.max_steps, generator=generator, progress=not args.no_progress,
        )
        history.append(losses)
        print(f"epoch {epoch}/{args.epochs}: loss {losses['loss']:.4f} ({int(losses['steps'])} steps)")
    save_checkpoint(
        model, args.out, category=args.category, epochs=args.epochs, repeat=args.repeat, lr=args.lr,
        lambda_svdd=args.lambda_svdd, batch_size=args.batch_size, seed=args.seed, history=history,
        train_seconds=time.perf_counter() - start,
    )
    print(f"saved {args.out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint
    from .device import resolve_device
    from .evaluate import evaluate_category, image_scores
    from .viz import plot_roc, save_gallery

    device = resolve_device(args.device)
    model, meta = load_checkpoint(args.checkpoint)  # fails before the data is decoded
    data = _load(args)
    model.to(device)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = evaluate_category(model, data, mode=args.search, progress=not args.no_progress)
    seconds = {**result.seconds, "total": time.perf_counter() - start}
    report = {
        **result.metrics,
        "category": args.category,
        "search": args.search,
        "device": str(device),
        "n_train": int(len(data.train_images)),
        "n_test": int(len(data.test_images)),
        "checkpoint": str(args.checkpoint),
        "checkpoint_metadata": {k: v for k, v in meta.items() if k != "history"},
        "seconds": seconds,
    }
    (args.out_dir / "metrics.json").write_text(json.dumps(report, indent=2))
    plot_roc(data.test_labels, {f: image_scores(result, f) for f in result.scores.maps}, args.out_dir / "roc.png")
    if not args.no_gallery:
        maps = result.scores.maps[args.fusion].numpy()
        save_gallery(args.out_dir / "maps", data.test_images, data.test_masks, maps, data.test_names)
    for key, value in result.metrics.items():
        print(f"{key:9s} {'n/a' if value is None else f'{value:.4f}'}")
    print(f"evaluated in {seconds['total']:.1f} s; wrote {args.out_dir / 'metrics.json'}")
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    from .certs import create_federation_certs

    out = create_federation_certs(args.out, args.director_host or ["localhost"], args.envoy, args.client or ["frontend"], args.days)
    for path in sorted(out.glob("*.crt")):
        print(f"wrote {path} and {path.with_suffix('.key')}")
    print(f"keep {out / 'root_ca.key'} off the nodes; give every node {out / 'root_ca.crt'} and its own .crt/.key")
    return 0


COMMANDS = {"synth": cmd_synth, "train": cmd_train, "evaluate": cmd_evaluate, "certs": cmd_certs}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ValueError as exc:  # MVTecDataError, CheckpointError and bad settings: a message, no traceback
        print(f"patchsvdd {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
