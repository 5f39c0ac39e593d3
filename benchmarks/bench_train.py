"""Training step: the previous step against the fused one, in one run, with a check that the losses agree.

    python benchmarks/bench_train.py [--steps 6] [--batch-size 64] [--device auto]

"previous": each K's encoder on its whole batch (the K=64 encoder on 4B
64x64 patches, the K=32 encoder on 4B 32x32 patches), NCHW, as the project
trained before. "fused fp32": one pass of the K=32 encoder over the quadrants
of every K=64 patch and every K=32 patch, channels-last, in chunks
(``patchsvdd.train.batch_embeddings``). "fused bf16": the same under bfloat16
autocast (on a GPU, or a CPU with AVX-512 BF16/AMX). Every variant runs
forward, backward and an Adam step on the same pre-drawn batches, timed in
turns, so the machine's noise hits all alike. Prints seconds per step, the
speed-up over "previous" and the largest loss difference to it.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch

from patchsvdd.data import index_category, load_category, standardise
from patchsvdd.device import resolve_device
from patchsvdd.loop import as_generator, bf16_supported
from patchsvdd.model import PatchSVDD, initialise
from patchsvdd.synth import generate_category
from patchsvdd.train import (
    LOSS_NAMES, PATCH_SIZES, TrainingBatch, batch_embeddings, batch_losses, make_optimizer, position_loss, sample_batch,
    svdd_loss,
)


def previous_losses(model: PatchSVDD, batch: TrainingBatch, lambda_svdd: float) -> dict[str, torch.Tensor]:
    """The losses as the project computed them before: one encoder call per K over its whole batch, NCHW."""
    out: dict[str, torch.Tensor] = {}
    total = 0.0
    for k in PATCH_SIZES:
        pos_a, pos_b, svdd_a, svdd_b = model.encoder_for(k)(batch.patches[k].contiguous()).chunk(4)
        out[f"loss_pos_{k}"] = position_loss(model.classifier_for(k), pos_a, pos_b, batch.labels[k])
        out[f"loss_svdd_{k}"] = svdd_loss(svdd_a, svdd_b)
        total = total + out[f"loss_pos_{k}"] + lambda_svdd * out[f"loss_svdd_{k}"]
    out["loss"] = total
    return out


def fused_losses(model: PatchSVDD, batch: TrainingBatch, lambda_svdd: float, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    device_type = next(model.parameters()).device.type
    with torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
        embeddings = batch_embeddings(model, batch)
    return batch_losses(model, batch, lambda_svdd, embeddings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    parser.add_argument("--batch-size", type=int, default=64, help="pairs per loss (paper: 64)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--init", default="kaiming", choices=("kaiming", "pytorch"))
    args = parser.parse_args()
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as root:
        generate_category(root, "fabric", seed=0, n_train=20, n_test_good=1, n_test_per_defect=1)
        data = load_category(index_category(root, "fabric"))
    images = torch.as_tensor(standardise(data.train_images, data.mean)).to(device)
    gen = as_generator(0)
    batches = [sample_batch(images, torch.randint(0, len(images), (args.batch_size,), generator=gen), gen)
               for _ in range(args.steps + 1)]
    torch.manual_seed(0)
    start_model = initialise(PatchSVDD(), args.init).to(device)

    variants = {"previous": lambda m, b: previous_losses(m, b, 1e-3),
                "fused fp32": lambda m, b: fused_losses(m, b, 1e-3, None)}
    if bf16_supported(device):
        variants["fused bf16"] = lambda m, b: fused_losses(m, b, 1e-3, torch.bfloat16)
    models = {name: copy.deepcopy(start_model) for name in variants}
    optimizers = {name: make_optimizer(model) for name, model in models.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    first_losses: dict[str, dict[str, float]] = {}
    for step, batch in enumerate(batches):
        for name, compute in variants.items():  # in turns: noise hits every variant alike
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            losses = compute(models[name], batch)
            optimizers[name].zero_grad(set_to_none=True)
            losses["loss"].backward()
            optimizers[name].step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step == 0:  # the same model and batch for all: the losses must agree
                first_losses[name] = {k: float(losses[k].detach()) for k in LOSS_NAMES}
            else:
                times[name].append(time.perf_counter() - start)

    print(f"device {device}, {torch.get_num_threads()} threads, batch {args.batch_size} pairs per loss "
          f"({20 * args.batch_size} 32x32 encoder inputs per step), init {args.init}, {args.steps} timed steps each")
    base = statistics.median(times["previous"])
    for name in variants:
        seconds = statistics.median(times[name])
        diff = max(abs(first_losses[name][k] - first_losses["previous"][k]) for k in LOSS_NAMES)
        rel = max(abs(first_losses[name][k] - first_losses["previous"][k]) / max(abs(first_losses["previous"][k]), 1e-12)
                  for k in LOSS_NAMES)
        print(f"  {name:11s} {seconds:6.3f} s/step  {base / seconds:4.2f}x  "
              f"largest loss difference to previous {diff:.2e} (relative {rel:.1e})")
    print("  losses at step 0:", {k: round(v, 5) for k, v in first_losses["previous"].items()})


if __name__ == "__main__":
    main()
