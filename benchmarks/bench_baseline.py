"""Is Patch SVDD worth it against the autoencoder baseline? Both trained on the same CPU budget, one run.

    python benchmarks/bench_baseline.py [--data-root ../shared/mvtec] [--category bottle]
        [--budget-minutes 8] [--demo-budget-minutes 4] [--search fast] [--out runs/bench_baseline]

For each data set (real ``--category`` where ``--data-root`` holds it, and the
built-in demo category ``washer``, generated under ``data/demo``): measure the
step time of each model here, turn the budget into a number of steps, train
centrally (all training images, one process) with a cosine schedule over those
steps, then evaluate on the test split: det/seg AUROC and AUPRO of the 'sum'
map, training time, and inference time per image (``Inspector.maps`` of a
bundle exported from the model, on the test images, after one warm-up image).

Rows: Patch SVDD with the CPU recipe (``RECIPES['cpu']``, batch 64), Patch SVDD
with the authors' released encoder where ``../shared/official`` has it (no
training), and the autoencoder (``RECIPES['autoencoder']``, batch 16). The
federated autoencoder row comes from the demo (``python -m patchsvdd.cli.demo
--model autoencoder``), whose figures docs/benchmarks.md quotes beside these.

Writes ``baseline.json`` into ``--out`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from patchsvdd.data.images import is_grayscale
from patchsvdd.data.mvtec import CategoryData, index_category, load_category
from patchsvdd.deploy.export import export_bundle
from patchsvdd.evaluation.evaluate import evaluate_category
from patchsvdd.models.registry import build_model, family
from patchsvdd.settings import DEFAULT_RECIPE, RECIPES, recipe_options
from patchsvdd.training.loop import make_optimizer, train_epoch

REPO = Path(__file__).resolve().parents[1]
OFFICIAL = REPO.parent / "shared" / "official"


def train_for(kind: str, data: CategoryData, budget_s: float) -> tuple[torch.nn.Module, dict]:
    """Train a fresh ``kind`` model for about ``budget_s`` seconds here; returns it and what it did."""
    recipe = RECIPES[DEFAULT_RECIPE[kind]]
    options = recipe_options(DEFAULT_RECIPE[kind], kind)
    channels = 1 if is_grayscale(data.train_images) else 3
    torch.manual_seed(0)
    probe = build_model(kind, channels=channels, **options)
    inputs = family(kind).inputs(probe, data.train_images, data.mean)
    times: list[float] = []
    last = [time.perf_counter()]

    def tick(*_) -> None:
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    train_epoch(
        probe, inputs, make_optimizer(probe, recipe.lr), recipe, repeat=10_000, max_steps=6, generator=0, on_step=tick
    )
    step_s = float(np.median(times[1:]))
    steps = max(1, int(budget_s / step_s))
    torch.manual_seed(0)
    model = build_model(kind, channels=channels, **options)
    optimizer = make_optimizer(model, recipe.lr)
    schedule = recipe.lr_schedule(steps)
    start = time.perf_counter()
    losses = train_epoch(
        model, inputs, optimizer, recipe, repeat=10_000, max_steps=steps, generator=0, schedule=schedule
    )
    seconds = time.perf_counter() - start
    print(
        f"  {kind}: {steps} steps of {step_s:.2f} s in {seconds:.0f} s; last epoch losses "
        + ", ".join(f"{k} {v:.4f}" for k, v in losses.items() if k != "steps"),
        flush=True,
    )
    return model, {"steps": steps, "step_s": step_s, "train_s": seconds, "batch": recipe.batch_size}


def score(model: torch.nn.Module, data: CategoryData, search: str) -> dict:
    """det/seg AUROC and AUPRO of the 'sum' map, and inference seconds per image through a bundle."""
    evaluation = evaluate_category(model, data, mode=search)
    with tempfile.TemporaryDirectory() as folder:
        inspector, _ = export_bundle(model, data, Path(folder) / "bundle")
        inspector.maps(data.test_images[:1])  # warm-up
        start = time.perf_counter()
        for image in data.test_images:
            inspector.maps(image[None])
        per_image = (time.perf_counter() - start) / len(data.test_images)
    metrics = {k: evaluation.metrics[k] for k in ("det_sum", "seg_sum", "aupro_sum")}
    return {**metrics, "infer_s_per_image": per_image}


def run_dataset(name: str, data: CategoryData, budget_s: float, search: str, released: Path | None) -> list[dict]:
    print(
        f"{name}: {len(data.train_images)} training, {len(data.test_images)} test images; budget {budget_s:.0f} s",
        flush=True,
    )
    rows = []
    for kind, label in (("patchsvdd", "Patch SVDD, CPU recipe"), ("autoencoder", "autoencoder (MSE + SSIM)")):
        model, trained = train_for(kind, data, budget_s)
        rows.append({"data": name, "model": label, **trained, **score(model, data, search)})
        print(f"  {rows[-1]}", flush=True)
    if released is not None:
        from patchsvdd.models.patchsvdd.released import import_released

        model, _ = import_released(name, released)
        rows.append(
            {
                "data": name,
                "model": "Patch SVDD, released encoder",
                "steps": 0,
                "train_s": 0.0,
                **score(model, data, search),
            }
        )
        print(f"  {rows[-1]}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "mvtec")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--budget-minutes", type=float, default=8.0, help="training budget per model on --category")
    parser.add_argument(
        "--demo-budget-minutes", type=float, default=4.0, help="training budget per model on the demo data"
    )
    parser.add_argument(
        "--search", choices=("exact", "fast"), default="fast", help="Patch SVDD's nearest-neighbour search"
    )
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_baseline")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows: list[dict] = []
    if (args.data_root / args.category / "train" / "good").is_dir():
        released = OFFICIAL / f"{args.category}_enchier.pkl"
        data = load_category(index_category(args.data_root, args.category))
        rows += run_dataset(
            args.category, data, 60 * args.budget_minutes, args.search, released if released.is_file() else None
        )
    else:
        print(f"{args.data_root / args.category}: not found, real data skipped")
    from patchsvdd.cli.demo import ensure_demo_data

    demo_root = ensure_demo_data(REPO / "data" / "demo", "washer")
    rows += run_dataset(
        "washer", load_category(index_category(demo_root, "washer")), 60 * args.demo_budget_minutes, args.search, None
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "baseline.json").write_text(json.dumps(rows, indent=1))
    print(
        f"\n| data | model | steps (batch) | train s | det_sum | seg_sum | aupro_sum | inference s/image |\n"
        f"|{'---|' * 8}"
    )
    for r in rows:
        steps = f"{r['steps']} ({r['batch']})" if r["steps"] else "released"
        print(
            f"| {r['data']} | {r['model']} | {steps} | {r['train_s']:.0f} | {r['det_sum']:.4f} | {r['seg_sum']:.4f} | "
            f"{r['aupro_sum']:.4f} | {r['infer_s_per_image']:.3f} |"
        )
    print(f"(search: {args.search}; wrote {args.out / 'baseline.json'})")


if __name__ == "__main__":
    main()
