"""Whole evaluation of a category (decode, embed both K, search, maps, metrics), exact vs fast search.

    python benchmarks/bench_evaluate.py [--data-root ../shared/mvtec] [--category bottle] [--checkpoint CKPT]
                                        [--modes fast exact exact-flat]

'exact-flat' is the exact search without cluster pruning (brute force, as before it), for a side-by-side.

Without a checkpoint the model is freshly initialised (seed 0): the timings do
not depend on the weights, and the AUROC gap between the two searches is what
matters here.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from patchsvdd.data.mvtec import index_category, load_category
from patchsvdd.evaluation.evaluate import evaluate_category
from patchsvdd.models.patchsvdd import scoring
from patchsvdd.models.patchsvdd.network import PatchSVDD
from patchsvdd.training.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "mvtec")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--modes", nargs="+", default=["fast", "exact"])
    args = parser.parse_args()
    if args.checkpoint:
        model, _ = load_checkpoint(args.checkpoint)
    else:
        torch.manual_seed(0)
        model = PatchSVDD()
    results = {}
    for mode in args.modes:
        start = time.perf_counter()
        data = load_category(index_category(args.data_root, args.category))
        decoded = time.perf_counter() - start
        prune_from = scoring.PRUNE_MIN_BANK
        scoring.PRUNE_MIN_BANK = 2**62 if mode == "exact-flat" else prune_from
        try:
            result = evaluate_category(model, data, mode="exact" if mode == "exact-flat" else mode)
        finally:
            scoring.PRUNE_MIN_BANK = prune_from
        total = time.perf_counter() - start
        results[mode] = result.metrics
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
        print(
            f"{mode:10s}: total {total:7.1f} s (decode {decoded:.1f} s, {parts}); "
            f"{len(data.train_images)} train / {len(data.test_images)} test images, threads {torch.get_num_threads()}"
        )
        print("       " + " ".join(f"{k}={v:.4f}" for k, v in result.metrics.items()))
    if {"fast", "exact"} <= set(results):
        gap = max(abs(results["fast"][k] - results["exact"][k]) for k in results["exact"])
        print(f"largest |AUROC fast - exact| over the 8 metrics: {gap:.4f}")
    if {"exact-flat", "exact"} <= set(results):
        gap = max(abs(results["exact-flat"][k] - results["exact"][k]) for k in results["exact"])
        print(f"largest |metric exact - exact-flat| (cluster pruning against brute force): {gap:.2e}")


if __name__ == "__main__":
    main()
