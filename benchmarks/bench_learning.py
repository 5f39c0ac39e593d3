"""Does training learn on a CPU? The paper's recipe against the project's CPU recipe, same budget, one run.

    python benchmarks/bench_learning.py [--data-root ../shared/mvtec] [--category bottle]
        [--budget-minutes 30] [--points 3] [--bank-every 4] [--out runs/bench_learning]

The recipes are ``patchsvdd.settings.RECIPES``: "paper" (PyTorch's initialisation,
Adam lr 1e-4 constant, fp32: the published settings and the authors' code) and
"cpu" (the project's defaults: He initialisation, lr 1e-3 after 100 warm-up
steps with a cosine decay to 1e-4, bf16 autocast where the CPU has it).
For each recipe: measure its step time on this machine, turn the budget into
a number of steps, train (batch 64 per loss, lambda 1e-3, all four losses)
and record every step's losses and embedding spread; at ``--points`` evenly
spaced steps (and step 0) score the test set with exact search. The memory
bank for those scores is every ``--bank-every``-th training image (exact
search over all 209 bottle images takes 4-6 minutes a point on this CPU);
the standardisation mean is always that of all training images. A recipe
whose encoder collapses stops with the message and is recorded as such.

Writes ``curve.json`` (every step and every scored point) and ``learning.png``
into ``--out``; prints a summary table.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from patchsvdd.data.mvtec import CategoryData, index_category, load_category, standardise
from patchsvdd.evaluation.evaluate import evaluate_category
from patchsvdd.models.patchsvdd.network import PatchSVDD, initialise
from patchsvdd.models.patchsvdd.training import CollapseError
from patchsvdd.models.registry import model_options
from patchsvdd.settings import RECIPES, TrainSettings, recipe_options
from patchsvdd.training.loop import make_optimizer, train_epoch

REPO = Path(__file__).resolve().parents[1]
LN8 = math.log(8)


def step_seconds(recipe: TrainSettings, images: torch.Tensor, steps: int = 6) -> float:
    """Median seconds of a training step of ``recipe`` here (after one warm-up step)."""
    torch.manual_seed(0)
    model = PatchSVDD()  # the initialisation does not change a step's time
    optimizer = make_optimizer(model, recipe.lr)
    times: list[float] = []
    last = [time.perf_counter()]

    def tick(step: int, _: dict) -> None:
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    train_epoch(
        model,
        images,
        optimizer,
        recipe,
        max_steps=steps + 1,
        generator=99,
        precision=recipe.precision,
        progress=False,
        on_step=tick,
    )
    return float(np.median(times[1:]))


def score(model: PatchSVDD, bank: CategoryData, mean: np.ndarray) -> dict[str, float | None]:
    return evaluate_category(model, bank, mode="exact", mean=mean).metrics


def run_recipe(
    name: str,
    recipe: TrainSettings,
    images: np.ndarray,
    bank: CategoryData,
    mean: np.ndarray,
    total_steps: int,
    points: int,
) -> dict:
    torch.manual_seed(0)
    options = model_options("patchsvdd", recipe_options(name, "patchsvdd"))
    model = initialise(PatchSVDD(init="pytorch"), options.init)  # PyTorch's layers, then the recipe's draw
    optimizer = make_optimizer(model, recipe.lr)
    schedule = recipe.lr_schedule(total_steps)
    marks = sorted({round(total_steps * i / points) for i in range(points + 1)})
    steps: list[dict] = []
    scored: list[dict] = []
    outcome = "finished"
    started = time.perf_counter()
    done = 0
    for mark in marks:
        if mark > done:
            try:
                repeat = math.ceil((mark - done) * recipe.batch_size / len(images))
                train_epoch(
                    model,
                    images,
                    optimizer,
                    recipe,
                    repeat=repeat,
                    batch_size=recipe.batch_size,
                    max_steps=mark - done,
                    generator=1000 + done,
                    schedule=schedule,
                    start_step=done,
                    precision=recipe.precision,
                    progress=False,
                    on_step=lambda s, v: steps.append({"step": s, "lr": schedule.lr_at(s), **v}),
                )
            except CollapseError as exc:
                outcome = f"collapsed: {exc}"
                print(f"[{name}] {exc}", flush=True)
                break
            done = mark
        metrics = score(model, bank, mean)
        scored.append({"step": done, "train_seconds": time.perf_counter() - started, **metrics})
        print(
            f"[{name}] step {done}/{total_steps}: det_sum {metrics['det_sum']:.4f} seg_sum {metrics['seg_sum']:.4f}"
            + (f" pos_64 {steps[-1]['loss_pos_64']:.3f} pos_32 {steps[-1]['loss_pos_32']:.3f}" if steps else ""),
            flush=True,
        )
    return {
        "recipe": {"name": name, **asdict(recipe)},
        "total_steps": total_steps,
        "outcome": outcome,
        "steps": steps,
        "scored": scored,
    }


def smooth(values: list[float], window: int = 25) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if len(values) < window:
        return values
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid")


def plot(results: list[dict], seconds_per_step: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(21, 4.2))
    for result in results:
        name = result["recipe"]["name"]
        minutes = seconds_per_step[name] / 60
        steps = result["steps"]
        if steps:
            x = np.array([s["step"] for s in steps]) * minutes
            for key, style in (("loss_pos_64", "-"), ("loss_pos_32", "--")):
                y = smooth([s[key] for s in steps])
                axes[0].plot(x[len(x) - len(y) :], y, style, label=f"{name} {key[5:]}")
            for key, style in (("loss_svdd_64", "-"), ("loss_svdd_32", "--")):
                y = smooth([s[key] for s in steps])
                axes[1].plot(x[len(x) - len(y) :], y, style, label=f"{name} {key[5:]}")
            for key, style in (("spread_64", "-"), ("spread_32", "--")):
                axes[2].plot(x, [s[key] for s in steps], style, label=f"{name} {key}")
        scored = result["scored"]
        xs = [p["step"] * minutes for p in scored]
        axes[3].plot(xs, [p["det_sum"] for p in scored], "o-", label=f"{name} det_sum")
        axes[3].plot(xs, [p["seg_sum"] for p in scored], "s--", label=f"{name} seg_sum")
    axes[0].axhline(LN8, color="grey", linestyle=":", label="ln 8 (chance)")
    titles = (
        "position losses (25-step mean)",
        "SVDD losses (25-step mean)",
        "embedding spread (std per dim)",
        "AUROC, exact search",
    )
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("training minutes on this CPU")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "mvtec")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--budget-minutes", type=float, default=30.0, help="training time per recipe")
    parser.add_argument("--points", type=int, default=3, help="scored points after step 0")
    parser.add_argument("--bank-every", type=int, default=4, help="memory bank: every n-th training image")
    parser.add_argument("--recipes", nargs="+", default=["paper", "cpu"], choices=sorted(RECIPES))
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_learning")
    args = parser.parse_args()
    data = load_category(index_category(args.data_root, args.category))
    mean = data.mean
    images = standardise(data.train_images, mean)
    bank = CategoryData(
        data.category,
        data.train_images[:: args.bank_every],
        data.test_images,
        data.test_masks,
        data.test_labels,
        data.defect_types,
        data.test_names,
    )
    seconds_per_step = {name: step_seconds(RECIPES[name], images) for name in args.recipes}
    budget = args.budget_minutes * 60
    plan = {name: max(1, int(budget / s)) for name, s in seconds_per_step.items()}
    print(
        f"{args.category}: {len(images)} training images, bank {len(bank.train_images)}, test {len(bank.test_images)}; "
        f"{torch.get_num_threads()} threads; budget {args.budget_minutes:g} min per recipe"
    )
    for name, s in seconds_per_step.items():
        print(f"  {name}: {s:.3f} s/step -> {plan[name]} steps", flush=True)
    results = [run_recipe(name, RECIPES[name], images, bank, mean, plan[name], args.points) for name in args.recipes]
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {
        "category": args.category,
        "budget_minutes": args.budget_minutes,
        "bank_every": args.bank_every,
        "seconds_per_step": seconds_per_step,
        "results": results,
    }
    (args.out / "curve.json").write_text(json.dumps(payload, indent=1))
    plot(results, seconds_per_step, args.out / "learning.png")
    print(
        f"\n| recipe | s/step | steps | pos_64 | pos_32 | spread_64 | spread_32 | det_sum step 0 | det_sum end | "
        f"seg_sum step 0 | seg_sum end | outcome |\n|{'---|' * 12}"
    )
    for result in results:
        name, steps, scored = result["recipe"]["name"], result["steps"], result["scored"]
        tail = steps[-50:] if steps else [{}]
        mean_of = lambda key, tail=tail, steps=steps: float(np.mean([s[key] for s in tail])) if steps else float("nan")  # noqa: E731
        print(
            f"| {name} | {seconds_per_step[name]:.3f} | {len(steps)} | {mean_of('loss_pos_64'):.3f} | "
            f"{mean_of('loss_pos_32'):.3f} | {mean_of('spread_64'):.2e} | {mean_of('spread_32'):.2e} | "
            f"{scored[0]['det_sum']:.4f} | {scored[-1]['det_sum']:.4f} | {scored[0]['seg_sum']:.4f} | "
            f"{scored[-1]['seg_sum']:.4f} | {result['outcome'].split(':')[0]} |"
        )
    print(f"(losses and spreads: mean of the last 50 steps; ln 8 = {LN8:.3f}) -> {args.out}")


if __name__ == "__main__":
    main()
