"""benchmarks/gpu_check.py, the one prepared script for a lent GPU: its CPU rehearsal (--dry-run) runs every
phase and writes every figure; without a GPU and without --dry-run it stops at once with one sentence; a
tensor on another device than expected is a failure that names it."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_dry_run_runs_every_phase_on_the_cpu(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    figures = json.loads((tmp_path / "gpu_check.json").read_text())
    assert figures["dry_run"] and figures["device"] == "cpu" and "failed" not in figures
    assert figures["tests"]["exit_code"] == 0
    assert figures["step"]["fp32"]["seconds_per_step"] > 0 and figures["step"]["fp32"]["tflops"] > 0
    for recipe in ("paper", "cpu"):
        trained = figures[f"recipe_{recipe}"]
        assert trained["training"]["steps"] > 0 and 0 <= trained["evaluation"]["seg_sum"] <= 1
    assert figures["evaluation"]["seconds"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the script would run")
def test_without_a_gpu_it_stops_at_once_with_a_sentence(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == (
        "gpu_check failed: torch sees no CUDA GPU here; run with --dry-run for a rehearsal on the CPU"
    )
    assert "torch sees no CUDA GPU" in json.loads((tmp_path / "gpu_check.json").read_text())["failed"]


def test_a_tensor_on_another_device_is_a_failure_that_names_it() -> None:
    module = load_script()
    with pytest.raises(module.CheckFailed, match=r"device mismatch: the model on \['cpu'\], expected cuda"):
        module.expect_device([torch.zeros(1)], torch.device("cuda"), "the model")
    module.expect_device([torch.zeros(1)], torch.device("cpu"), "the model")
    figures: dict = {}
    with pytest.raises(
        module.CheckFailed, match="^step: device mismatch: Expected all tensors to be on the same device"
    ):
        module.phase(
            "step",
            figures,
            lambda: (_ for _ in ()).throw(
                RuntimeError("Expected all tensors to be on the same device, but found cuda:0 and cpu")
            ),
        )
