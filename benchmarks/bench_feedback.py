"""Operator feedback on a real bundle: do the false alarms go, what does it cost, does the rest hold?

    python benchmarks/bench_feedback.py [--data-root ../shared/mvtec] [--category bottle]
        [--released ../shared/official/bottle_enchier.pkl | --checkpoint CKPT] [--out runs/bench_feedback]

Exports a bundle the way ``patchsvdd export`` does by default (``--bank-fraction auto``; thresholds
calibrated on the category's test images; what each candidate bank measured is printed), then plays
an operator who looks at every test image once:

1. every good test image the bundle flags (a false alarm) is marked good (``deploy.feedback.teach``);
2. every defective test image it passes (a miss) is marked defective.

After each step it reports, on the test images no step teaches (the same "rest" for every row): image
AUROC, false alarms and misses at the bundle's threshold; for the taught images, how many now decide as
the operator said; the seconds per feedback, the bank's rows, the current version's size and that of all
versions on disk (hard links once); and that ``rollback``, once per change, returns the export's bundle
byte for byte.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from patchsvdd.data.mvtec import index_category, load_category
from patchsvdd.deploy.bundle import bundle_bytes, read_bundle
from patchsvdd.deploy.export import export_bundle
from patchsvdd.deploy.feedback import teach
from patchsvdd.deploy.inspector import load_bundle
from patchsvdd.deploy.versions import current_folder, digest, rollback
from patchsvdd.evaluation.report import markdown_table
from patchsvdd.models.patchsvdd.released import import_released
from patchsvdd.training.checkpoint import load_checkpoint

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def _scores(bundle: Path, images: np.ndarray) -> tuple[np.ndarray, float]:
    inspector = load_bundle(bundle, device="cpu")
    maps = inspector.maps(images)
    return maps.reshape(len(maps), -1).max(axis=1), inspector.image_threshold.value


def _disk_bytes(folder: Path) -> int:
    """Bytes on disk under ``folder``, each hard-linked file once."""
    seen: dict[tuple[int, int], int] = {}
    for path in folder.rglob("*"):
        if path.is_file():
            stat = path.stat()
            seen[(stat.st_dev, stat.st_ino)] = stat.st_size
    return sum(seen.values())


def _row(step: str, scores: np.ndarray, threshold: float, labels: np.ndarray, rest: np.ndarray, bundle: Path) -> dict:
    flagged = scores >= threshold
    info = read_bundle(bundle).info
    return {
        "step": step,
        "threshold": threshold,
        "det AUROC (rest)": roc_auc_score(labels[rest], scores[rest]),
        "false alarms (rest)": int((flagged & (labels == 0) & rest).sum()),
        "misses (rest)": int((~flagged & (labels == 1) & rest).sum()),
        "bank rows K=32": info["bank_rows"]["32"],
        "version MB": bundle_bytes(current_folder(bundle)) / 1e6,
        "all versions MB": _disk_bytes(bundle) / 1e6,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", type=Path, default=SHARED / "mvtec")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--released", type=Path, default=SHARED / "official" / "bottle_enchier.pkl")
    parser.add_argument("--checkpoint", type=Path, default=None, help="a project checkpoint instead of --released")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_feedback"))
    args = parser.parse_args()
    data = load_category(index_category(args.data_root, args.category))
    if args.checkpoint is not None:
        model, _ = load_checkpoint(args.checkpoint)
    else:
        model, _ = import_released(args.category, source=str(args.released))
    shutil.rmtree(args.out, ignore_errors=True)
    bundle = args.out / "bundle"
    start = time.perf_counter()
    _, calibration = export_bundle(model.eval(), data, bundle, bank_fraction="auto")
    export_seconds = time.perf_counter() - start
    print(markdown_table(calibration.bank_choice), flush=True)
    exported = digest(bundle)
    labels = data.test_labels.astype(int)
    scores, threshold = _scores(bundle, data.test_images)
    false_alarms = np.nonzero((scores >= threshold) & (labels == 0))[0]
    misses = np.nonzero((scores < threshold) & (labels == 1))[0]
    print(
        f"{args.category}: {len(labels)} test images; exported (auto bank) in {export_seconds:.0f} s; "
        f"{len(false_alarms)} false alarm(s), {len(misses)} miss(es) at threshold {threshold:.4g}",
        flush=True,
    )
    rest = np.ones(len(labels), dtype=bool)  # the images no step teaches: every row is measured on them
    rest[false_alarms] = rest[misses] = False
    rows = [_row("exported", scores, threshold, labels, rest, bundle)]
    timings: dict[str, list[float]] = {"good": [], "defective": []}
    for label, chosen in (("good", false_alarms), ("defective", misses)):
        for index in chosen:
            start = time.perf_counter()
            teach(bundle, data.test_images[index][None], label, request=f"bench: test image {data.test_names[index]}")
            timings[label].append(time.perf_counter() - start)
        scores, threshold = _scores(bundle, data.test_images)
        taught_right = int(((scores[chosen] >= threshold) == (label == "defective")).sum())
        row = _row(f"after {len(chosen)} {label}", scores, threshold, labels, rest, bundle)
        row["taught images deciding as told"] = f"{taught_right}/{len(chosen)}"
        rows.append(row)
    steps = len(false_alarms) + len(misses)
    for _ in range(steps):
        rollback(bundle)
    back = digest(bundle) == exported and read_bundle(bundle).info.get("bundle_version", 1) == 1
    columns = list(rows[0]) + ["taught images deciding as told"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        cells = [row.get(c, "") for c in columns]
        print("| " + " | ".join(f"{c:.4f}" if isinstance(c, float) else str(c) for c in cells) + " |")
    for label, seconds in timings.items():
        if seconds:
            print(f"seconds per {label} feedback: median {np.median(seconds):.2f}, max {max(seconds):.2f}")
    print(f"rollback x{steps}: back to the export's bundle byte for byte: {back}")
    return 0 if back else 1


if __name__ == "__main__":
    sys.exit(main())
