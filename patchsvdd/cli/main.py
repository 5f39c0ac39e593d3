"""Command line: patchsvdd synth | train | evaluate | export | predict | serve | bundle | import-weights | certs.

This module only parses: the commands live in ``commands`` (synth, train,
import-weights, certs) and ``inspect_commands`` (evaluate, export, predict,
serve). Heavy imports happen inside each command so that ``patchsvdd --help``
is quick and bad arguments fail before any work. A user's mistake (an
``InputError``: bad file, folder or setting) is printed as one line with exit
code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from patchsvdd.errors import InputError


class DefaultsHelp(argparse.HelpFormatter):
    """Help that shows each option's default where it has one (not for required or recipe-chosen ones)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        hidden = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if not hidden and "default" not in text:
            text += " (default: %(default)s)"
        return text


def at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number not below ``low`` (nor above ``high`` when given)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value}: must be at least {low}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{value}: must be at most {high}")
        return value

    return parse


def bank_fraction(text: str) -> float | str:
    """--bank-fraction: 'auto' or a share in (0, 1]."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: 'auto' or a number in (0, 1]") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text}: the share must be in (0, 1]")
    return value


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", required=True, type=Path, help="folder holding <category>/ in the MVTec AD layout")
    p.add_argument("--category", required=True, help="category folder name, e.g. bottle (evaluate: or 'all')")
    p.add_argument(
        "--rank-worldsize", default="1,1", help="use only shard RANK of WORLD_SIZE, e.g. 1,2 (default: all data)"
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    from patchsvdd.data.synth import CATEGORIES
    from patchsvdd.models.registry import model_names
    from patchsvdd.settings import DEMO_DATA, EMB_DIM, INIT_SCHEMES, PRECISIONS, RECIPES, SCHEDULES

    parser = argparse.ArgumentParser(
        prog="patchsvdd", description="Federated Patch SVDD: anomaly detection and localisation on MVTec-layout images."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    synth = sub.add_parser(
        "synth", formatter_class=DefaultsHelp, help="write a procedural demo category in the MVTec AD layout"
    )
    synth.add_argument("--out", required=True, type=Path, help="data root to write <category>/ into")
    synth.add_argument("--category", default="fabric", choices=sorted(CATEGORIES))
    # defaults: the demo's data (settings.DEMO_DATA), so that `synth --category washer` writes what `make demo` uses
    synth.add_argument("--seed", type=int, default=DEMO_DATA["seed"], help="random seed of the generated images")
    synth.add_argument("--n-train", type=at_least(1), default=DEMO_DATA["n_train"], help="good training images")
    synth.add_argument("--n-test-good", type=at_least(1), default=DEMO_DATA["n_test_good"], help="good test images")
    synth.add_argument(
        "--n-test-per-defect",
        type=at_least(1),
        default=DEMO_DATA["n_test_per_defect"],
        help="test images of each defect type",
    )
    synth.add_argument(
        "--image-size",
        type=at_least(256),
        default=DEMO_DATA["image_size"],
        help="side in pixels (>= 256; the reader resizes to 256)",
    )

    train = sub.add_parser(
        "train",
        formatter_class=DefaultsHelp,
        help="train Patch SVDD or the autoencoder baseline on one category locally (centralised)",
    )
    _add_data_args(train)
    train.add_argument(
        "--model",
        choices=model_names(),
        default="patchsvdd",
        help="patchsvdd, or autoencoder: the convolutional autoencoder baseline (MSE + SSIM loss)",
    )
    train.add_argument(
        "--epochs", type=at_least(0), required=True, help="passes over the data (0: save the initialised model)"
    )
    train.add_argument("--out", required=True, type=Path, help="checkpoint file to write")
    train.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        help="defaults of the settings below: cpu (He init, lr 1e-3, warm-up, cosine, bf16 where fast; "
        "measured to learn on a CPU), paper (PyTorch init, constant lr 1e-4, fp32), autoencoder "
        "(lr 1e-3, batch 16, one pass per epoch) (None: cpu for patchsvdd, autoencoder for the autoencoder)",
    )
    train.add_argument("--repeat", type=at_least(1), help="times each image is used per epoch (None: the recipe's)")
    train.add_argument("--max-steps", type=at_least(1), default=None, help="cut each epoch to at most this many steps")
    train.add_argument("--batch-size", type=at_least(1), help="pairs per loss (None: the recipe's)")
    train.add_argument("--lr", type=float, help="peak learning rate (None: the recipe's)")
    train.add_argument("--lambda-svdd", type=float, help="weight of the SVDD loss, lambda (None: the recipe's)")
    train.add_argument("--warmup-steps", type=at_least(0), help="linear learning-rate warm-up (None: the recipe's)")
    train.add_argument("--schedule", choices=SCHEDULES, help="after the warm-up: cosine decay to lr/10, or constant")
    train.add_argument(
        "--precision", choices=PRECISIONS, help="auto: bf16 autocast where the GPU/CPU has it, else fp32"
    )
    train.add_argument("--init", choices=INIT_SCHEMES, help="weight initialisation of a fresh model")
    train.add_argument("--emb-dim", type=at_least(1), default=EMB_DIM, help="D, the embedding size")
    train.add_argument("--seed", type=int, default=0, help="random seed of the initialisation and the sampling")

    ev = sub.add_parser(
        "evaluate",
        formatter_class=DefaultsHelp,
        help="score a category (or all) with a checkpoint; write metrics.json, maps and ROC",
    )
    _add_data_args(ev)
    weights = ev.add_mutually_exclusive_group(required=True)
    weights.add_argument("--checkpoint", type=Path, help="one checkpoint (for every category with --category all)")
    weights.add_argument("--checkpoint-dir", type=Path, help="a folder holding <category>.pt for each category")
    weights.add_argument(
        "--weights",
        choices=("official",),
        help="official: the authors' released encoder of each category (downloaded once, checked)",
    )
    ev.add_argument(
        "--out-dir",
        required=True,
        type=Path,
        help="where metrics.json etc. go; with --category all one folder per category, and "
        "results.md, results.csv, results.png",
    )
    ev.add_argument("--search", choices=("exact", "fast"), default="exact", help="nearest-neighbour search")
    ev.add_argument(
        "--fusion",
        default="sum",
        choices=("64", "32", "sum", "mult", "l2", "ssim"),
        help="map shown in the gallery: Patch SVDD's 64, 32, sum, mult; the autoencoder's l2, ssim, sum",
    )
    ev.add_argument("--no-gallery", action="store_true", help="skip the per-image PNGs")

    export = sub.add_parser(
        "export",
        formatter_class=DefaultsHelp,
        help="make a site bundle: the model, this site's memory banks (Patch SVDD) or error scales "
        "(autoencoder), thresholds calibrated on its labelled images",
    )
    _add_data_args(export)
    export.add_argument("--checkpoint", required=True, type=Path, help="the model (e.g. a federation's last.pt)")
    export.add_argument("--out", required=True, type=Path, help="bundle folder to write")
    export.add_argument(
        "--bank-fraction",
        type=bank_fraction,
        default="auto",
        help="share of the training patches the memory banks keep: 'auto' (the smallest k-center bank within "
        "0.005 AUROC of the full one on the labelled calibration images, measured and written to "
        "calibration.md; the full bank without defective images), or a number in (0, 1]; 1 keeps all",
    )
    export.add_argument(
        "--subsample",
        choices=("kcenter", "random"),
        default="kcenter",
        help="how --bank-fraction picks patches: kcenter (covering, per grid position; default) or random",
    )
    export.add_argument(
        "--max-fpr",
        type=float,
        default=None,
        help="image threshold at this false-positive rate on good images (default: at maximum F1)",
    )
    export.add_argument(
        "--calibration-root",
        type=Path,
        default=None,
        help="a data root whose <category>/test calibrates the thresholds (default: --data-root's)",
    )

    predict = sub.add_parser(
        "predict",
        formatter_class=DefaultsHelp,
        help="inspect images with a bundle: a CSV of decisions and one PNG per image",
    )
    predict.add_argument("bundle", type=Path, help="bundle folder written by 'patchsvdd export'")
    predict.add_argument("inputs", nargs="+", type=Path, help="image files or folders (searched recursively)")
    predict.add_argument("--out", required=True, type=Path, help="folder for predictions.csv and the PNGs")
    predict.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    predict.add_argument("--no-progress", action="store_true", help="no progress bar")

    serve = sub.add_parser(
        "serve",
        formatter_class=DefaultsHelp,
        help="serve a bundle over HTTP: POST /infer, GET /health, GET /info (FastAPI)",
    )
    serve.add_argument("bundle", type=Path, help="bundle folder written by 'patchsvdd export'")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    serve.add_argument("--port", type=at_least(1, 65535), default=8080, help="port to listen on")
    serve.add_argument(
        "--max-bytes", type=at_least(1), default=20 * 1024 * 1024, help="largest request accepted, in bytes"
    )
    serve.add_argument("--workers", type=at_least(1), default=2, help="requests scored at once")
    serve.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    serve.add_argument(
        "--token-file",
        type=Path,
        default=None,
        help="a file whose first line is a token (16+ characters): every endpoint but /health and the page "
        "then needs 'Authorization: Bearer <token>'",
    )
    serve.add_argument(
        "--allow-feedback",
        action="store_true",
        help="accept POST /feedback (needs --token-file): good images join the memory bank, defective ones "
        "recalibrate the threshold; each change is a new bundle version",
    )
    serve.add_argument("--watch", type=Path, default=None, help="a camera folder: inspect each new image in it")
    serve.add_argument("--recent", type=at_least(1), default=24, help="decisions the page lists (kept in memory)")

    bundle = sub.add_parser(
        "bundle",
        formatter_class=DefaultsHelp,
        help="change a site bundle: add confirmed good or defective images, roll back, show its history",
    )
    bundle_sub = bundle.add_subparsers(dest="bundle_command", required=True)
    for name, label in (("add-good", "good"), ("add-defective", "defective")):
        adder = bundle_sub.add_parser(
            name,
            formatter_class=DefaultsHelp,
            help=f"teach the bundle that these images are {label} "
            + (
                "(their patches join the memory bank; no training)"
                if label == "good"
                else "(kept for calibration; the threshold is chosen again)"
            ),
        )
        adder.add_argument("bundle", type=Path, help="bundle folder written by 'patchsvdd export'")
        adder.add_argument("images", nargs="+", type=Path, help="image files or folders (searched recursively)")
        adder.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
        adder.set_defaults(label=label)
    rollback = bundle_sub.add_parser("rollback", help="return to the bundle's previous version")
    rollback.add_argument("bundle", type=Path, help="bundle folder")
    shown = bundle_sub.add_parser("history", help="list the bundle's versions since export")
    shown.add_argument("bundle", type=Path, help="bundle folder")

    released = sub.add_parser(
        "import-weights",
        formatter_class=DefaultsHelp,
        help="import the authors' released encoder of a category as a checkpoint",
    )
    released.add_argument("--category", required=True, help="an MVTec AD category, e.g. bottle")
    released.add_argument(
        "--source",
        help="the released enchier.pkl: a file or URL (default: downloaded once from the "
        "original repository at a pinned commit, SHA-256 checked, cached)",
    )
    released.add_argument("--out", required=True, type=Path, help="checkpoint file to write")

    certs = sub.add_parser(
        "certs",
        formatter_class=DefaultsHelp,
        help="create a root authority and mutual-TLS certificates for every node (offline)",
    )
    certs.add_argument("--out", required=True, type=Path, help="folder for root_ca.* and one .crt/.key per node")
    certs.add_argument(
        "--director-host", action="append", help="name(s) the others use to reach the director (default localhost)"
    )
    certs.add_argument(
        "--envoy", action="append", required=True, help="envoy name (its certificate's common name); repeat"
    )
    certs.add_argument("--client", action="append", help="notebook client id (default frontend); repeat")
    certs.add_argument("--days", type=at_least(1), default=365, help="validity of the certificates")
    return parser


def _commands() -> dict[str, Callable[[argparse.Namespace], int]]:
    from patchsvdd.cli import inspect_commands, make_commands

    return {
        "synth": make_commands.cmd_synth,
        "train": make_commands.cmd_train,
        "import-weights": make_commands.cmd_import_weights,
        "certs": make_commands.cmd_certs,
        "evaluate": inspect_commands.cmd_evaluate,
        "export": inspect_commands.cmd_export,
        "predict": inspect_commands.cmd_predict,
        "serve": inspect_commands.cmd_serve,
        "bundle": inspect_commands.cmd_bundle,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _commands()[args.command](args)
    except InputError as exc:  # a bad file, folder or setting: one line, no traceback
        print(f"patchsvdd {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
