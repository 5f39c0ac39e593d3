"""The CUDA path on a real GPU, in one call of at most 9 minutes: tests, the step's speed, training, evaluation.

    python benchmarks/gpu_check.py [--data-root DIR] [--released FILE] [--minutes 2.0] [--out DIR]
    python benchmarks/gpu_check.py --dry-run     # the same on the CPU with every budget shrunk (the suite runs it)

1. **tests**: ``pytest -m cuda`` (tests/test_cuda.py: the device choice, the dense embedding against the CPU's,
   a training step in fp32 and bf16, the exact search against float64, a category's evaluation) and
   tests/test_device.py, in a child process;
2. **step**: the training step of batch 64 pairs per loss (the paper's), fp32 and bf16 autocast, in one run,
   with its convolutions' FLOP/s against a large matrix product's in the same precision and the GPU's
   nominal peak (by name, where known);
3. **training**: the paper's recipe and the CPU recipe, each for ``--minutes`` on the category (real bottle
   where ``--data-root`` holds it, else a generated one), then an exact-search evaluation on the GPU: det/seg
   AUROC (sum) against the paper's, steps per second;
4. **evaluation**: the whole evaluation of the category with exact search on the GPU, of the authors'
   released encoder where ``--released`` names it (the CPU's figure for that: ``CPU_EVALUATION_SECONDS``),
   else of the paper-recipe model;
5. every figure into ``OUT/gpu_check.json`` (``$OUT`` when set, else ``--out``).

Any device mismatch, or any other failure, ends the run with exit code 1 and one sentence naming the phase.
On the device machine (no faiss, OpenFL or pytorch-msssim there; none is needed) run it from the checkout
with ``PYTHONPATH=.`` and the data carried in an ignored folder (docs/benchmarks.md, "The CUDA path").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_train import matmul_rate, step_flops  # noqa: E402

from patchsvdd.data.mvtec import CategoryData, index_category, load_category, standardise  # noqa: E402
from patchsvdd.data.synth import generate_category  # noqa: E402
from patchsvdd.device import resolve_device  # noqa: E402
from patchsvdd.evaluation.categories import PAPER_AUROC  # noqa: E402
from patchsvdd.evaluation.evaluate import evaluate_category  # noqa: E402
from patchsvdd.models.patchsvdd.network import PatchSVDD, initialise  # noqa: E402
from patchsvdd.models.registry import model_options  # noqa: E402
from patchsvdd.settings import PAPER_SETTINGS, TrainSettings, recipe_options  # noqa: E402
from patchsvdd.training.loop import make_optimizer, resolve_precision, train_epoch  # noqa: E402

# The whole exact-search evaluation of bottle (209 training, 83 test images) with the released encoder on the
# project's 2-core CPU (docs/benchmarks.md, "Exact search on saturated embeddings").
CPU_EVALUATION_SECONDS = 209.4
# Nominal dense peaks (TFLOP/s: float32 without tensor cores, TF32 and bf16 with them) by the GPU's name.
PEAKS = {"H100": (67.0, 494.7, 989.4), "H200": (67.0, 494.7, 989.4), "A100": (19.5, 156.0, 312.0)}


class CheckFailed(RuntimeError):
    """A phase failed; the message is the one sentence the run ends with."""


def expect_device(tensors: list[torch.Tensor], device: torch.device, what: str) -> None:
    """CheckFailed unless every tensor lies on ``device``'s type."""
    wrong = {str(t.device) for t in tensors if t.device.type != device.type}
    if wrong:
        raise CheckFailed(f"device mismatch: {what} on {sorted(wrong)}, expected {device.type}")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_tests(budget: float) -> dict[str, Any]:
    """The cuda-marked tests and the device tests, in a child process (a crash there is a failed phase)."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda or not slow"]
    command += ["tests/test_cuda.py", "tests/test_device.py", "-o", "addopts=-rs"]
    started = time.monotonic()
    out = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=budget)
    last = (out.stdout.strip().splitlines() or ["(no output)"])[-1]
    result = {"exit_code": out.returncode, "summary": last, "seconds": round(time.monotonic() - started, 1)}
    if out.returncode != 0:
        raise CheckFailed(f"the CUDA tests failed: {last} (output: {out.stdout[-1500:]}{out.stderr[-500:]})")
    return result


def time_steps(model: PatchSVDD, inputs: torch.Tensor, recipe: TrainSettings, steps: int) -> float:
    """Seconds per training step (after one warm-up step) of ``recipe`` on ``inputs``."""
    optimizer = make_optimizer(model, recipe.lr)
    train_epoch(model, inputs, optimizer, recipe, max_steps=1, generator=0)
    device = next(model.parameters()).device
    synchronize(device)
    started = time.perf_counter()
    train_epoch(model, inputs, optimizer, recipe, max_steps=steps, generator=1)
    synchronize(device)
    return (time.perf_counter() - started) / steps


def step_speed(device: torch.device, inputs: torch.Tensor, batch_size: int, steps: int) -> dict[str, Any]:
    """The step's time and FLOP/s in fp32 and (where the device has it) bf16, against matrix products."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peaks = next((p for key, p in PEAKS.items() if key in name), None)
    out: dict[str, Any] = {"device_name": name, "batch_size": batch_size}
    precisions = ["fp32"] + (["bf16"] if resolve_precision("auto", device) == torch.bfloat16 else [])
    for precision in precisions:
        torch.manual_seed(0)
        model = initialise(PatchSVDD(), "kaiming").to(device)
        seconds = time_steps(model, inputs, TrainSettings(batch_size=batch_size, precision=precision), steps)
        expect_device(list(model.parameters()), device, f"the model after {precision} steps")
        rate = step_flops(model, batch_size) / seconds
        matmul = matmul_rate(device, n=4096 if device.type == "cuda" else 512)
        out[precision] = {
            "seconds_per_step": seconds,
            "tflops": rate / 1e12,
            "matmul_tflops": matmul / 1e12,
            "share_of_matmul": rate / matmul,
        }
        if peaks:  # fp32 convolutions run in TF32 where cuDNN may use it (PyTorch's default)
            fp32_peak = peaks[1] if torch.backends.cudnn.allow_tf32 else peaks[0]
            peak = peaks[2] if precision == "bf16" else fp32_peak
            out[precision]["nominal_peak_tflops"] = peak
            out[precision]["share_of_peak"] = rate / 1e12 / peak
    if "bf16" in out:
        out["bf16_speedup"] = out["fp32"]["seconds_per_step"] / out["bf16"]["seconds_per_step"]
    return out


def train_for(
    recipe: TrainSettings, init: str, data: CategoryData, device: torch.device, seconds: float, chunk: int
) -> tuple[PatchSVDD, dict[str, Any]]:
    """A fresh model (weights drawn by ``init``) trained with ``recipe`` for about ``seconds`` on ``data``'s
    training images."""
    torch.manual_seed(0)
    model = initialise(PatchSVDD(), init).to(device)
    optimizer = make_optimizer(model, recipe.lr)
    inputs = torch.from_numpy(standardise(data.train_images, data.mean))
    first = time.perf_counter()
    train_epoch(model, inputs, optimizer, recipe, max_steps=chunk, generator=0)  # the rate, for the schedule
    synchronize(device)
    per_step = (time.perf_counter() - first) / chunk
    total = max(chunk, int(seconds / per_step))
    schedule = recipe.lr_schedule(total)
    done, losses = chunk, {}
    started = time.perf_counter()
    while done < total and time.perf_counter() - first < seconds:
        losses = train_epoch(
            model, inputs, optimizer, recipe, max_steps=chunk, generator=done, schedule=schedule, start_step=done
        )
        done += chunk
    synchronize(device)
    expect_device(list(model.parameters()), device, "the trained model")
    elapsed = time.perf_counter() - started
    rate = (done - chunk) / elapsed if elapsed > 0 else 0.0
    return model, {
        "steps": done,
        "steps_per_second": rate,
        "last_losses": losses,
        "seconds": time.perf_counter() - first,
    }


def evaluate(model: PatchSVDD, data: CategoryData, category: str) -> dict[str, Any]:
    """Exact-search evaluation on the model's device: AUROCs, seconds, and the paper's figures beside."""
    started = time.perf_counter()
    result = evaluate_category(model, data, mode="exact", with_aupro=False)
    synchronize(next(model.parameters()).device)
    paper = PAPER_AUROC.get(category)
    return {
        "det_sum": result.metrics["det_sum"],
        "seg_sum": result.metrics["seg_sum"],
        "paper_det": paper[0] if paper else None,
        "paper_seg": paper[1] if paper else None,
        "seconds": time.perf_counter() - started,
        "stages": {k: round(v, 2) for k, v in result.seconds.items()},
    }


def phase(name: str, figures: dict[str, Any], call: Callable[[], Any]) -> None:
    """Run one phase into ``figures[name]``; any failure becomes CheckFailed naming the phase."""
    started = time.monotonic()
    print(f"[gpu_check] {name} ...", flush=True)
    try:
        figures[name] = call()
    except CheckFailed as exc:
        raise CheckFailed(f"{name}: {exc}") from exc
    except Exception as exc:
        kind = "device mismatch" if "device" in str(exc).lower() else type(exc).__name__
        raise CheckFailed(f"{name}: {kind}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    print(f"[gpu_check] {name}: {json.dumps(figures[name], default=str)[:600]} ({time.monotonic() - started:.0f} s)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, every budget shrunk: a rehearsal")
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "mvtec")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--released", type=Path, default=None, help="the authors' released encoder of the category")
    parser.add_argument("--minutes", type=float, default=2.0, help="training time of each recipe")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/gpu_check")))
    args = parser.parse_args()
    device = resolve_device("cpu" if args.dry_run else "auto")
    figures: dict[str, Any] = {"dry_run": args.dry_run, "device": str(device), "torch": torch.__version__}
    try:
        if device.type != "cuda" and not args.dry_run:
            raise CheckFailed("torch sees no CUDA GPU here; run with --dry-run for a rehearsal on the CPU")
        with tempfile.TemporaryDirectory() as tmp:
            root, category = args.data_root, args.category
            if args.dry_run or not (root / category / "train" / "good").is_dir():
                root, category = Path(tmp), "fabric"
                generate_category(root, category, seed=0, n_train=6, n_test_good=2, n_test_per_defect=1)
            data = load_category(index_category(root, category))
            figures["data"] = {"category": category, "train": len(data.train_images), "test": len(data.test_images)}
            phase("tests", figures, lambda: run_tests(120 if args.dry_run else 240))
            inputs = torch.from_numpy(standardise(data.train_images, data.mean))
            batch, steps = (4, 2) if args.dry_run else (64, 10)
            phase("step", figures, lambda: step_speed(device, inputs, batch, steps))
            seconds = 3.0 if args.dry_run else args.minutes * 60
            chunk = 2 if args.dry_run else 50
            recipes = {"paper": PAPER_SETTINGS, "cpu": TrainSettings()}
            if args.dry_run:
                recipes = {name: replace(recipe, batch_size=4) for name, recipe in recipes.items()}
            models = {}
            for name, recipe in recipes.items():

                def train_and_score(recipe: TrainSettings = recipe, name: str = name) -> dict[str, Any]:
                    init = model_options("patchsvdd", recipe_options(name, "patchsvdd")).init
                    models[name], trained = train_for(recipe, init, data, device, seconds, chunk)
                    return {"training": trained, "evaluation": evaluate(models[name], data, category)}

                phase(f"recipe_{name}", figures, train_and_score)

            def evaluation_time() -> dict[str, Any]:
                if args.released is not None and args.released.is_file():
                    from patchsvdd.models.patchsvdd.released import import_released

                    model, _ = import_released(args.category, args.released)
                    which = "released encoder"
                else:
                    model, which = models["paper"], "paper-recipe model"
                result = evaluate(model.to(device), data, category)
                result["model"] = which
                if which == "released encoder" and category == "bottle":
                    result["cpu_seconds"] = CPU_EVALUATION_SECONDS
                    result["speedup_over_cpu"] = CPU_EVALUATION_SECONDS / result["seconds"]
                return result

            phase("evaluation", figures, evaluation_time)
    except CheckFailed as failure:
        figures["failed"] = str(failure)
        write(figures, args.out)
        print(f"gpu_check failed: {failure}", file=sys.stderr)
        return 1
    write(figures, args.out)
    print(f"gpu_check passed; figures in {args.out / 'gpu_check.json'}")
    return 0


def write(figures: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(figures, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
