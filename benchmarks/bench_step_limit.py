"""How near the hardware's limit the fp32 training step's convolutions run: each layer against plain matrix products.

A 3x3 convolution is a matrix product once its input is unfolded (im2col): forward (M,K)@(K,N), the input's
gradient (M,N)@(N,K) and the weight's gradient (N,M)@(M,K), with M = inputs x output pixels, K = C_in x 9 and
N = C_out. For each layer of the K=32 encoder at the shapes one training step gives it (chunks of
``ENCODER_CHUNK`` 32x32 inputs, channels-last, as ``batch_embeddings`` runs them), this times the convolution's
forward and backward (PyTorch, oneDNN) against those three matrix products on ready-made matrices (BLAS, with no
unfolding, so a lower bound on what any im2col convolution can take), and prints the rate each reaches beside a
2048^3 product's. When the convolutions take about as long as the bare products of their shapes, the step is at
what the matrix engine delivers for those shapes: only fewer FLOPs (another algorithm) would make it faster.
The whole fp32 step (sampling, both encoders, losses, backward, Adam; the project's own functions) is timed in
the same run, so that the share of it outside the convolutions shows.

    python benchmarks/bench_step_limit.py [--batch-size 64] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from bench_train import matmul_rate  # the 2048^3 product's rate, measured as bench_train measures it

from patchsvdd.device import timing_flags
from patchsvdd.models.patchsvdd.network import SMALL_ENCODER_CHANNELS, SMALL_PATCH, PatchSVDD
from patchsvdd.models.patchsvdd.options import EMB_DIM
from patchsvdd.models.patchsvdd.training import ENCODER_CHUNK, batch_losses, sample_batch
from patchsvdd.training.loop import as_generator, make_optimizer

INPUTS_PER_PAIR = 20  # per pair of each loss: 2 x 4 quadrants (K=64) + 2 patches (K=32), for position and SVDD


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``run()`` over ``repeats`` calls after one untimed call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def layer_shapes(chunk: int) -> list[dict[str, int]]:
    """Each convolution of the K=32 encoder on ``chunk`` 32x32 inputs: channels, stride, input and output size."""
    channels = (*SMALL_ENCODER_CHANNELS, EMB_DIM)
    size, layers = SMALL_PATCH, []
    for i, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:])):
        stride = 2 if i == 0 else 1
        out = (size - 3) // stride + 1
        layers.append({"n": chunk, "c_in": c_in, "c_out": c_out, "stride": stride, "size": size, "out": out})
        size = out
    return layers


def time_layer(layer: dict[str, int], first: bool, repeats: int) -> tuple[float, float, float]:
    """(convolution forward+backward s, the three matrix products' s, FLOPs) for one layer on one chunk."""
    n, c_in, c_out, out = layer["n"], layer["c_in"], layer["c_out"], layer["out"]
    x = torch.randn(n, c_in, layer["size"], layer["size"]).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(not first)  # the first layer's input (the image patches) needs no gradient
    weight = (torch.randn(c_out, c_in, 3, 3) * 0.05).requires_grad_()
    bias = torch.zeros(c_out, requires_grad=True)
    grad_out = torch.randn(n, c_out, out, out).contiguous(memory_format=torch.channels_last)

    def convolution() -> None:
        y = F.conv2d(x, weight, bias, stride=layer["stride"])
        y.backward(grad_out)

    m, k = n * out * out, c_in * 9
    columns, w_t, w, dy, dy_t = (
        torch.randn(m, k),
        torch.randn(k, c_out),
        torch.randn(c_out, k),
        torch.randn(m, c_out),
        torch.randn(c_out, m),
    )

    def products() -> None:
        columns @ w_t  # forward
        if not first:
            dy @ w  # the input's gradient
        dy_t @ columns  # the weight's gradient

    flops = 2.0 * m * k * c_out * (2 if first else 3)
    with torch.no_grad():
        gemm = median_seconds(products, repeats)
    return median_seconds(convolution, repeats), gemm, flops


def step_seconds(batch_size: int, repeats: int) -> float:
    """Median seconds of one whole fp32 training step at ``batch_size`` pairs per loss, on 20 random 256x256
    images (standardised images' scale): drawing the pairs, both encoders, the losses, backward and Adam."""
    torch.manual_seed(0)
    model = PatchSVDD()
    optimizer = make_optimizer(model)
    images, generator = torch.randn(20, 3, 256, 256) * 0.2, as_generator(0)

    def step() -> None:
        index = torch.randint(0, len(images), (batch_size,), generator=generator)
        loss = batch_losses(model, sample_batch(images, index, generator), lambda_svdd=1e-3)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return median_seconds(step, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64, help="pairs per loss (the paper's 64)")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per measurement (median)")
    args = parser.parse_args()
    inputs = INPUTS_PER_PAIR * args.batch_size
    chunks = inputs / ENCODER_CHUNK
    print(
        f"fp32, {torch.get_num_threads()} threads, CPU flags {timing_flags()}; "
        f"batch {args.batch_size}: {inputs} 32x32 inputs a step = {chunks:g} chunks of {ENCODER_CHUNK}"
    )
    peak = matmul_rate(torch.device("cpu"))
    print(f"a 2048^3 product: {peak / 1e9:.0f} GFLOP/s")
    print("layer  c_in->c_out  out   M x K x N (per chunk)    conv ms  products ms  conv/products  products GFLOP/s")
    total_conv = total_gemm = total_flops = 0.0
    for i, layer in enumerate(layer_shapes(ENCODER_CHUNK)):
        conv, gemm, flops = time_layer(layer, first=i == 0, repeats=args.repeats)
        total_conv, total_gemm, total_flops = total_conv + conv, total_gemm + gemm, total_flops + flops
        shape = f"{layer['n'] * layer['out'] ** 2} x {layer['c_in'] * 9} x {layer['c_out']}"
        print(
            f"{i + 1:5d}  {layer['c_in']:4d}->{layer['c_out']:<4d}  {layer['out']:3d}  {shape:23s}  "
            f"{conv * 1e3:7.1f}  {gemm * 1e3:11.1f}  {conv / gemm:13.2f}  {flops / gemm / 1e9:15.0f}"
        )
    print(
        f"all    per step: convolutions {total_conv * chunks:.3f} s, bare products {total_gemm * chunks:.3f} s "
        f"(ratio {total_conv / total_gemm:.2f}); {total_flops * chunks / 1e9:.0f} GFLOP; the products reach "
        f"{total_flops / total_gemm / peak:.2f} of the 2048^3 rate, the convolutions "
        f"{total_flops / total_conv / peak:.2f}"
    )
    step = step_seconds(args.batch_size, args.repeats)
    print(
        f"the whole fp32 step: {step:.3f} s, of which the convolutions' forward and backward "
        f"{total_conv * chunks / step:.2f} (the rest: activations, copies, sampling, losses, Adam)"
    )


if __name__ == "__main__":
    main()
