"""Exact nearest-neighbour search on saturated embeddings, next to the float64-re-ranking reference, per stage.

    python benchmarks/bench_exact_search.py [--bank-images 320] [--test-images 160] [--queries 16384]
                                            [--latent 4] [--case saturated|bottle|spread|all]

The K=32 bank of a real category: 3249 patches per image (stride 4 on 256 px), so 320 training images give
1,039,680 rows of D=64, and 160 test images 519,840 queries. The embeddings are built like a saturated
released encoder's (screw, carpet, leather, wood): a common offset of +-0.9 to +-1 per dimension and
perturbations of about 1e-4 along a ``--latent``-dimensional smooth surface, as patch embeddings lie on
(plus isotropic noise of 1e-6). 'bottle' is the bottle-sized case (209 training and 83 test images,
perturbations of 0.1, no offset); 'spread' puts the perturbations in all 64 dimensions at random (where no
cluster can be skipped and the search falls back to brute force).

Only ``--queries`` of the test queries are searched (all of them with ``--queries 0``); times are per query
and extrapolated to the category's whole query count. Both methods search the same queries in one run:

- reference: centre on the bank's mean, float32 candidates by brute force (faiss's flat index), re-ranked by
  direct float64 differences (the approach of the independent reference, and this project's exact search
  before the clusters);
- exact: ``scoring.exact_nearest`` (clusters that cannot hold a nearer row are skipped).

Each is checked against a float64 brute force on 512 of the queries (largest relative error; the target is
1e-3). The CPU flags that matter are printed.
"""

from __future__ import annotations

import argparse
import time

import torch

from patchsvdd.device import timing_flags
from patchsvdd.models.patchsvdd import scoring

PATCHES_PER_IMAGE = 57 * 57  # K=32, stride 4, 256 px
CASES = {"saturated": (320, 160, 1e-4, True), "bottle": (209, 83, 1e-1, False), "spread": (320, 160, 1e-4, True)}


def embeddings(n: int, latent: int, scale: float, offset: bool, spread: bool, seed: int) -> torch.Tensor:
    """(n, 64) float32: offset (+-0.9..1 per dimension, shared) + ``scale`` x a smooth function of ``latent``
    uniform coordinates (or, ``spread``, independent normal values in all 64 dimensions) + noise 1e-6."""
    shared = torch.Generator().manual_seed(7)
    sign = torch.where(torch.rand(64, generator=shared) < 0.5, -1.0, 1.0).double()
    centre = (
        sign * (0.9 + 0.1 * torch.rand(64, generator=shared, dtype=torch.float64))
        if offset
        else torch.zeros(64, dtype=torch.float64)
    )
    mixing = torch.randn(latent, 64, generator=shared, dtype=torch.float64)
    own = torch.Generator().manual_seed(seed)
    if spread:
        variation = torch.randn(n, 64, generator=own, dtype=torch.float64)
    else:
        variation = torch.tanh(torch.rand(n, latent, generator=own, dtype=torch.float64) @ mixing)
    noise = 1e-6 * torch.randn(n, 64, generator=own, dtype=torch.float64)
    return (centre + scale * variation + noise).float()


def reference(queries: torch.Tensor, bank: torch.Tensor, seconds: dict[str, float]) -> torch.Tensor:
    start = time.perf_counter()
    centred_queries, centred_bank = scoring.centre_on_bank(queries, bank)
    seconds["centre"] = time.perf_counter() - start
    start = time.perf_counter()
    candidates = scoring._faiss_candidates(centred_queries, centred_bank, scoring.RERANK)
    seconds["flat"] = time.perf_counter() - start
    start = time.perf_counter()
    distances = scoring._in_chunks(centred_queries, centred_bank, candidates)
    seconds["rerank"] = time.perf_counter() - start
    return distances


def float64_truth(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Nearest distances by float64 brute force, the bank's mean off first (exactly, in float64)."""
    mean = bank.double().mean(0)
    centred = bank.double() - mean
    return torch.cat(
        [
            torch.cdist(queries[i : i + 64].double() - mean, centred).min(dim=1).values
            for i in range(0, queries.shape[0], 64)
        ]
    )


def run_case(name: str, args: argparse.Namespace) -> None:
    bank_images, test_images, scale, offset = CASES[name]
    bank_images = args.bank_images if name != "bottle" else bank_images
    test_images = args.test_images if name != "bottle" else test_images
    bank = embeddings(bank_images * PATCHES_PER_IMAGE, args.latent, scale, offset, name == "spread", seed=1)
    all_queries = test_images * PATCHES_PER_IMAGE
    count = all_queries if args.queries == 0 else min(args.queries, all_queries)
    queries = embeddings(count, args.latent, scale, offset, name == "spread", seed=2)
    truth = float64_truth(queries[:512], bank)
    print(
        f"\n{name}: bank {bank.shape[0]:,} x 64, {count:,} of {all_queries:,} queries "
        f"({bank_images} training, {test_images} test images), perturbation {scale:g}"
        f"{', offset +-0.9..1' if offset else ''}, latent {args.latent if name != 'spread' else 64}"
    )
    totals = {}
    for method in ("reference", "exact"):
        seconds: dict[str, float] = {}
        start = time.perf_counter()
        found = (
            reference(queries, bank, seconds)
            if method == "reference"
            else scoring.exact_nearest(queries, bank, seconds=seconds)
        )
        total = time.perf_counter() - start
        share = seconds.pop("scanned_share", None)
        fixed = seconds.get("clusters", 0.0)  # once per bank, not per query
        whole = fixed + (total - fixed) * all_queries / count
        totals[method] = whole
        error = float(((found[:512].double() - truth).abs() / truth.clamp_min(1e-30)).max())
        stages = ", ".join(f"{stage} {value:.1f} s" for stage, value in seconds.items())
        scanned = f", scanned {share:.2%} of the bank per query" if share is not None else ""
        print(
            f"  {method:9s} {total:7.1f} s ({stages}{scanned}); whole category {whole / 60:6.1f} min; "
            f"largest relative error {error:.1e}"
        )
    print(f"  exact / reference, whole category: {totals['exact'] / totals['reference']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank-images", type=int, default=320)
    parser.add_argument("--test-images", type=int, default=160)
    parser.add_argument("--queries", type=int, default=16384, help="test queries searched (0: all)")
    parser.add_argument("--latent", type=int, default=4)
    parser.add_argument("--case", choices=[*CASES, "all"], default="all")
    args = parser.parse_args()
    print(f"CPU flags: {timing_flags()}; torch threads {torch.get_num_threads()}")
    for name in CASES if args.case == "all" else [args.case]:
        run_case(name, args)


if __name__ == "__main__":
    main()
