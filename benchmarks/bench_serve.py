"""Serving a site bundle: size, accuracy of a subsampled memory bank, latency, throughput, a bounded load test.

    python benchmarks/bench_serve.py [--data-root ../shared/mvtec] [--category bottle]
        [--checkpoint CKPT | --released ../shared/official/bottle_enchier.pkl] [--fractions 1.0 0.1]
        [--subsample kcenter|random] [--requests 500] [--clients 8] [--out runs/bench_serve]

For each bank fraction: export a bundle from the model and the category's
training images (thresholds calibrated on its test images), report its size and
the detection / segmentation AUROC of its maps on the test images (sum fusion,
the bank searched as the service does), then start ``patchsvdd serve`` on it as
a process on loopback and measure single-request latency (p50 / p95 over 20
requests, after 2 warm-up requests) for a 256x256 and a 1024x1024 PNG, the
throughput with 4 concurrent clients, and a load test: ``--requests`` requests
from ``--clients`` clients over the test images, every answer checked against
the in-process inspector, errors counted, the server's resident memory before
and after.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from sklearn.metrics import roc_auc_score

from patchsvdd.data.mvtec import index_category, load_category
from patchsvdd.deploy.bundle import bundle_bytes
from patchsvdd.deploy.export import export_bundle
from patchsvdd.federated.local import Processes, wait_for
from patchsvdd.models.patchsvdd.released import import_released
from patchsvdd.system.probes import free_port, service_healthy
from patchsvdd.training.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]


def png(array: np.ndarray, size: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).resize((size, size), Image.Resampling.BICUBIC).save(buffer, format="PNG")
    return buffer.getvalue()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def post(client: httpx.Client, url: str, body: bytes) -> dict:
    answer = client.post(f"{url}/infer", files={"file": ("x.png", body, "image/png")}, timeout=300)
    answer.raise_for_status()
    return answer.json()


def latencies(url: str, body: bytes, count: int = 20) -> tuple[float, float]:
    with httpx.Client() as client:
        for _ in range(2):
            post(client, url, body)
        times = []
        for _ in range(count):
            start = time.perf_counter()
            post(client, url, body)
            times.append(time.perf_counter() - start)
    times.sort()
    return statistics.median(times), times[int(0.95 * (len(times) - 1))]


def concurrent(url: str, bodies: list[bytes], requests: int, clients: int) -> tuple[float, list[dict], int]:
    """(seconds, answers in request order, errors) for ``requests`` requests from ``clients`` threads."""

    def ask(i: int) -> dict:
        with httpx.Client() as client:
            try:
                return post(client, url, bodies[i % len(bodies)])
            except httpx.HTTPError:
                return {}  # counted as an error below

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(ask, range(requests)))
    return time.perf_counter() - start, answers, sum(1 for answer in answers if not answer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "mvtec")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--released", type=Path, default=REPO.parent / "shared" / "official" / "bottle_enchier.pkl")
    parser.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.1])
    parser.add_argument("--subsample", choices=("kcenter", "random"), default="kcenter")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_serve")
    args = parser.parse_args()
    if args.checkpoint:
        model, _ = load_checkpoint(args.checkpoint)
    else:
        model, _ = import_released(args.category, args.released)
    data = load_category(index_category(args.data_root, args.category))
    labels, masks = data.test_labels, data.test_masks
    rows = []
    for fraction in args.fractions:
        folder = args.out / f"bundle_{fraction:g}"
        start = time.perf_counter()
        inspector, calibration = export_bundle(model, data, folder, bank_fraction=fraction, subsample=args.subsample)
        export_s = time.perf_counter() - start
        maps = inspector.maps(data.test_images)
        det = roc_auc_score(labels, maps.reshape(len(maps), -1).max(axis=1))
        seg = roc_auc_score(masks.ravel(), maps.ravel())
        expected = calibration.scores
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with Processes() as processes:
            node = processes.start(
                "serve",
                [sys.executable, "-m", "patchsvdd.cli.main", "serve", str(folder), "--port", str(port)],
                folder.parent / f"serve_{fraction:g}.log",
            )
            start = time.perf_counter()
            wait_for(lambda url=url: service_healthy(url), 600, "the service to answer /health", [node])
            load_s = time.perf_counter() - start
            p50_256, p95_256 = latencies(url, png(data.test_images[0], 256))
            p50_1024, p95_1024 = latencies(url, png(data.test_images[0], 1024), count=10)
            bodies = [png(image, 256) for image in data.test_images]
            seconds, _, _ = concurrent(url, bodies, 40, 4)
            throughput = 40 / seconds
            memory_before = rss_mib(node.process.pid)
            load_seconds, answers, errors = concurrent(url, bodies, args.requests, args.clients)
            memory_after = rss_mib(node.process.pid)
        wrong = sum(
            1
            for i, answer in enumerate(answers)
            if not answer
            or abs(answer["score"] - expected[i % len(bodies)]) > 1e-4 * max(1.0, expected[i % len(bodies)])
        )
        row = dict(
            fraction=fraction,
            subsample=args.subsample if fraction < 1 else "-",
            size_mb=bundle_bytes(folder) / 1e6,
            export_s=export_s,
            load_s=load_s,
            det_sum=det,
            seg_sum=seg,
            p50_256=p50_256,
            p95_256=p95_256,
            p50_1024=p50_1024,
            p95_1024=p95_1024,
            throughput_4=throughput,
            load_requests=args.requests,
            load_s_total=load_seconds,
            load_errors=errors,
            load_wrong=wrong,
            rss_before_mib=memory_before,
            rss_after_mib=memory_after,
            bank_search=inspector.search,
        )
        rows.append(row)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    full = next((r for r in rows if r["fraction"] == 1.0), None)
    print(
        "\n| bank | size | K=32 search | det_sum | seg_sum | p50 / p95 256² | p50 / p95 1024² | req/s, 4 clients | "
        f"{args.requests} req, {args.clients} clients: errors, wrong, RSS before -> after |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        gap = (
            ""
            if full is None or r is full
            else f" ({r['det_sum'] - full['det_sum']:+.4f} / {r['seg_sum'] - full['seg_sum']:+.4f})"
        )
        print(
            f"| {r['fraction']:g} {r['subsample']} | {r['size_mb']:.1f} MB | {r['bank_search']} "
            f"| {r['det_sum']:.4f} | {r['seg_sum']:.4f}{gap} | "
            f"{r['p50_256']:.3f} / {r['p95_256']:.3f} s | {r['p50_1024']:.3f} / {r['p95_1024']:.3f} s | "
            f"{r['throughput_4']:.2f} | {r['load_errors']}, {r['load_wrong']}, "
            f"{r['rss_before_mib']:.0f} -> {r['rss_after_mib']:.0f} MiB |"
        )


if __name__ == "__main__":
    main()
