"""Dense embedding vs patch-by-patch embedding of the same images (speed ratio and largest difference).

python benchmarks/bench_embed.py [--images 2] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch

from patchsvdd.models.patchsvdd.network import PatchSVDD


def patch_by_patch(model: PatchSVDD, image: torch.Tensor, chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop every K=64 patch at stride 16 and every K=32 patch at stride 4 and embed each: (D,13,13), (D,57,57)."""
    out = []
    for k, encoder in ((64, model.encoder), (32, model.encoder.small)):
        stride = model.strides[k]
        patches = image.unfold(1, k, stride).unfold(2, k, stride)  # (3,G,G,K,K)
        grid = patches.shape[1]
        patches = patches.permute(1, 2, 0, 3, 4).reshape(-1, 3, k, k)
        emb = torch.cat([encoder(patches[i : i + chunk]) for i in range(0, len(patches), chunk)])
        out.append(emb.reshape(grid, grid, -1).permute(2, 0, 1))
    return out[0], out[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = PatchSVDD().eval()
    images = torch.randn(args.images, 3, 256, 256) * 0.2
    with torch.no_grad():
        model.embed(images[:1])  # warm-up
        start = time.perf_counter()
        dense = model.embed(images)
        dense_s = time.perf_counter() - start
        start = time.perf_counter()
        naive = [patch_by_patch(model, image) for image in images]
        naive_s = time.perf_counter() - start
    diff = max(
        max((dense[0][i] - naive[i][0]).abs().max().item(), (dense[1][i] - naive[i][1]).abs().max().item())
        for i in range(args.images)
    )
    print(f"images: {args.images} of 256x256, threads: {torch.get_num_threads()}")
    print(f"dense embed:          {dense_s / args.images:8.3f} s/image")
    print(f"patch by patch:       {naive_s / args.images:8.3f} s/image")
    print(f"speed-up:             {naive_s / dense_s:8.1f}x")
    print(f"max |difference|:     {diff:.2e}")


if __name__ == "__main__":
    main()
