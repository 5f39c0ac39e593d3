"""Training step: the previous step against the fused one, in one run, with a check that the losses agree.

    python benchmarks/bench_train.py [--steps 6] [--batch-size 64] [--device auto] [--authors PATH]

"previous": each K's encoder on its whole batch (the K=64 encoder on 4B
64x64 patches, the K=32 encoder on 4B 32x32 patches), NCHW, as the project
trained before. "fused fp32": one pass of the K=32 encoder over the quadrants
of every K=64 patch and every K=32 patch, channels-last, in chunks
(``patchsvdd.models.patchsvdd.training.batch_embeddings``). "fused bf16": the same under bfloat16
autocast (on a GPU, or a CPU with AVX-512 BF16/AMX). Every variant runs
forward, backward and an Adam step on the same pre-drawn batches, timed in
turns, so the machine's noise hits all alike. Prints what precision 'auto'
chooses here and why, the CPU's flags, seconds per step, the speed-up over
"previous" and the largest loss difference to it.

"authors'" (with ``--authors PATH``, a checkout of the authors' repository
nuclearboy95/Anomaly-Detection-PatchSVDD-PyTorch at the commit of
``patchsvdd.models.patchsvdd.released.SOURCE_COMMIT``): their ``EncoderHier`` and
``PositionClassifier`` with their own loss functions (``PositionClassifier.infer``,
``SVDD_Dataset.infer``: four encoder calls a step, NCHW, fp32), on the same
patches, so only the networks' step is timed, not their data loader. Its losses
differ (other weights); its time is the reference of "fused fp32 / authors'".
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from patchsvdd.data.mvtec import index_category, load_category, standardise
from patchsvdd.data.synth import generate_category
from patchsvdd.device import bf16_support, resolve_device, timing_flags
from patchsvdd.models.patchsvdd.network import PatchSVDD, initialise
from patchsvdd.models.patchsvdd.training import (
    LOSS_NAMES,
    PATCH_SIZES,
    TrainingBatch,
    batch_embeddings,
    batch_losses,
    position_loss,
    sample_batch,
    svdd_loss,
)
from patchsvdd.training.loop import as_generator, make_optimizer


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


def fused_losses(
    model: PatchSVDD, batch: TrainingBatch, lambda_svdd: float, dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    device_type = next(model.parameters()).device.type
    with torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
        embeddings = batch_embeddings(model, batch)
    return batch_losses(model, batch, lambda_svdd, embeddings)


def authors_step(path: Path, device: torch.device):
    """The authors' networks and loss functions, imported from their checkout at ``path``: a callable
    (model, batch) -> {'loss': ...} on this project's batches, and a fresh model (their modules in a ModuleList)."""
    sys.path.insert(0, str(path))
    from codes.datasets import SVDD_Dataset  # the authors' code, not this project's
    from codes.networks import EncoderHier, PositionClassifier

    torch.manual_seed(0)
    model = torch.nn.ModuleList([EncoderHier(64, 64), PositionClassifier(64, 64), PositionClassifier(32, 64)]).to(
        device
    )

    def losses(m: torch.nn.ModuleList, batch: TrainingBatch) -> dict[str, torch.Tensor]:
        enc, cls_64, cls_32 = m
        total = 0.0
        for k, encoder, classifier in ((64, enc, cls_64), (32, enc.enc, cls_32)):
            pos_a, pos_b, svdd_a, svdd_b = batch.patches[k].contiguous().chunk(4)
            total = (
                total
                + PositionClassifier.infer(classifier, encoder, (pos_a, pos_b, batch.labels[k]))
                + 1e-3 * SVDD_Dataset.infer(encoder, (svdd_a, svdd_b))
            )
        return {"loss": total}

    return losses, model


def step_flops(model: PatchSVDD, batch_size: int) -> float:
    """Floating-point operations of one training step's convolutions: each of the 20B 32x32 inputs through
    the K=32 encoder forward (2 x multiply-adds), and twice that backward (the gradients of the weights and
    of each layer's input; the first layer's input needs none). The K=64 head and the classifiers add < 1 %."""
    size, forward, first = 32, 0.0, None
    for conv in (m for m in model.encoder.small.modules() if isinstance(m, torch.nn.Conv2d)):
        size = (size - conv.kernel_size[0]) // conv.stride[0] + 1
        macs = size * size * conv.out_channels * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        first = macs if first is None else first
        forward += macs
    return 20 * batch_size * 2 * (3 * forward - first)


def matmul_rate(device: torch.device, n: int = 2048, repeats: int = 8) -> float:
    """FLOP/s of a large float32 matrix product here, the best of ``repeats`` (BLAS: as near the hardware's peak
    as software gets)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    parser.add_argument("--batch-size", type=int, default=64, help="pairs per loss (paper: 64)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--init", default="kaiming", choices=("kaiming", "pytorch"))
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="time bf16 autocast even where it is not native (e.g. under ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI, "
        "which makes oneDNN emulate bf16 as a CPU without AVX-512 BF16 does)",
    )
    parser.add_argument(
        "--authors",
        type=Path,
        default=None,
        help="a checkout of the authors' repository, to time their training step beside",
    )
    args = parser.parse_args()
    device = resolve_device(args.device)
    support = bf16_support(device)
    print(f"precision auto on {device}: {support.reason}")
    print(f"CPU flags: {timing_flags()}; ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', 'unset')}")
    with tempfile.TemporaryDirectory() as root:
        generate_category(root, "fabric", seed=0, n_train=20, n_test_good=1, n_test_per_defect=1)
        data = load_category(index_category(root, "fabric"))
    images = torch.as_tensor(standardise(data.train_images, data.mean)).to(device)
    gen = as_generator(0)
    batches = [
        sample_batch(images, torch.randint(0, len(images), (args.batch_size,), generator=gen), gen)
        for _ in range(args.steps + 1)
    ]
    torch.manual_seed(0)
    start_model = initialise(PatchSVDD(), args.init).to(device)

    variants = {
        "previous": lambda m, b: previous_losses(m, b, 1e-3),
        "fused fp32": lambda m, b: fused_losses(m, b, 1e-3, None),
    }
    if support.native or args.bf16:
        variants["fused bf16"] = lambda m, b: fused_losses(m, b, 1e-3, torch.bfloat16)
    models = {name: copy.deepcopy(start_model) for name in variants}
    if args.authors is not None:
        variants["authors'"], models["authors'"] = authors_step(args.authors, device)
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
                first_losses[name] = {k: float(losses[k].detach()) for k in LOSS_NAMES if k in losses}
            else:
                times[name].append(time.perf_counter() - start)

    print(
        f"device {device}, {torch.get_num_threads()} threads, batch {args.batch_size} pairs per loss "
        f"({20 * args.batch_size} 32x32 encoder inputs per step), init {args.init}, {args.steps} timed steps each"
    )
    base = statistics.median(times["previous"])
    flops, peak = step_flops(start_model, args.batch_size), matmul_rate(device)
    print(f"  {flops / 1e9:.0f} GFLOP per step; a 2048^3 float32 matrix product runs at {peak / 1e9:.0f} GFLOP/s here")
    for name in variants:
        seconds = statistics.median(times[name])
        print(
            f"  {name:11s} {flops / seconds / 1e9:6.0f} GFLOP/s = {flops / seconds / peak:4.2f} of the matrix product"
        )
        if name == "authors'":
            print(
                f"  {name:11s} {seconds:6.3f} s/step  {base / seconds:4.2f}x  (other weights: losses not compared); "
                f"fused fp32 / authors' = {statistics.median(times['fused fp32']) / seconds:.2f}"
            )
            continue
        diff = max(abs(first_losses[name][k] - first_losses["previous"][k]) for k in LOSS_NAMES)
        rel = max(
            abs(first_losses[name][k] - first_losses["previous"][k]) / max(abs(first_losses["previous"][k]), 1e-12)
            for k in LOSS_NAMES
        )
        print(
            f"  {name:11s} {seconds:6.3f} s/step  {base / seconds:4.2f}x  "
            f"largest loss difference to previous {diff:.2e} (relative {rel:.1e})"
        )
    print("  losses at step 0:", {k: round(v, 5) for k, v in first_losses["previous"].items()})


if __name__ == "__main__":
    main()
