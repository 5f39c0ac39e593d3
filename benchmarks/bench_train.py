"""Training steps per second (all four losses, Adam) on demo data.

    python benchmarks/bench_train.py [--steps 10] [--batch-sizes 64 32]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from patchsvdd.data import index_category, load_category, standardise
from patchsvdd.model import PatchSVDD
from patchsvdd.synth import generate_category
from patchsvdd.train import make_optimizer, train_epoch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 32])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        generate_category(root, "fabric", seed=0, n_train=20, n_test_good=1, n_test_per_defect=1)
        data = load_category(index_category(root, "fabric"))
    images = standardise(data.train_images, data.mean)
    print(f"device: {args.device}, threads: {torch.get_num_threads()}, {len(images)} images")
    for batch in args.batch_sizes:
        torch.manual_seed(0)
        model = PatchSVDD().to(args.device)
        optimizer = make_optimizer(model)
        train_epoch(model, images, optimizer, repeat=batch, batch_size=batch, max_steps=1, generator=0, progress=False)
        start = time.perf_counter()
        train_epoch(model, images, optimizer, repeat=100, batch_size=batch, max_steps=args.steps, generator=1, progress=False)
        seconds = time.perf_counter() - start
        print(f"batch {batch:3d}: {args.steps / seconds:6.3f} steps/s ({seconds / args.steps:.2f} s/step, "
              f"{batch * 4} pairs/step)")


if __name__ == "__main__":
    main()
