"""The CUDA path: the device choice, the models, a training step in fp32 and bf16, the exact search and a
category's evaluation on a GPU, each against the CPU or a float64 reference. Marked ``cuda``; they skip where
torch sees no GPU (every CI machine), and ``benchmarks/gpu_check.py`` runs them where one is lent.

Tolerances follow from the arithmetic: cuDNN may run float32 convolutions in TF32 (10-bit mantissa,
relative error about 1e-3 per product, summed over a few hundred terms), so GPU and CPU embeddings are
compared with TF32 off, within float32's epsilon times the products summed along the network's deepest path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from patchsvdd.data.mvtec import index_category, load_category
from patchsvdd.device import resolve_device
from patchsvdd.evaluation.evaluate import evaluate_category
from patchsvdd.models.patchsvdd.network import PatchSVDD
from patchsvdd.models.patchsvdd.scoring import exact_nearest
from patchsvdd.settings import TrainSettings
from patchsvdd.training.loop import make_optimizer, resolve_precision, train_epoch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA GPU here"),
]
CUDA = torch.device("cuda")


def fp32_worst_case(model: torch.nn.Module) -> float:
    """float32's epsilon times the products summed along the network's deepest path (each convolution's
    in_channels x kernel area): a bound on two summation orders' difference for activations of order 1."""
    terms = sum(
        m.in_channels * m.kernel_size[0] * m.kernel_size[1] for m in model.modules() if isinstance(m, torch.nn.Conv2d)
    )
    return torch.finfo(torch.float32).eps * terms


@pytest.fixture
def no_tf32():
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_auto_chooses_the_gpu_and_bf16_where_it_is_native() -> None:
    assert resolve_device("auto").type == "cuda"
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    assert resolve_precision("auto", CUDA) == expected


def test_the_dense_embedding_on_the_gpu_equals_the_cpus(no_tf32) -> None:
    torch.manual_seed(0)
    model = PatchSVDD(emb_dim=64).eval()
    images = torch.randn(2, 3, 256, 256) * 0.2
    with torch.no_grad():
        cpu64, cpu32 = model.embed(images)
        gpu64, gpu32 = model.to(CUDA).embed(images.to(CUDA))
    assert gpu64.device.type == "cuda" and gpu32.device.type == "cuda"
    for cpu, gpu in ((cpu64, gpu64), (cpu32, gpu32)):  # tanh outputs: of order 1 at most
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=fp32_worst_case(model))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_training_step_runs_on_the_gpu(precision: str) -> None:
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    torch.manual_seed(0)
    model = PatchSVDD(emb_dim=16).to(CUDA)
    before = [p.detach().clone() for p in model.parameters()]
    inputs = torch.randn(4, 3, 256, 256) * 0.2  # on the CPU: the step moves what it samples to the model's device
    recipe = TrainSettings(batch_size=8, repeat=2, precision=precision)
    losses = train_epoch(model, inputs, make_optimizer(model), recipe, max_steps=2, generator=0)
    assert losses["steps"] == 2 and all(np.isfinite(v) for v in losses.values())
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_the_exact_search_on_the_gpu_matches_float64() -> None:
    generator = torch.Generator().manual_seed(0)
    bank = torch.randn(5000, 64, generator=generator)
    queries = torch.randn(300, 64, generator=generator)
    found = exact_nearest(queries, bank, device=CUDA)
    reference = torch.cdist(queries.double(), bank.double()).min(dim=1).values
    torch.testing.assert_close(found.double().cpu(), reference, rtol=1e-6, atol=1e-6)


def test_a_category_evaluates_on_the_gpu(tiny_root: Path) -> None:
    torch.manual_seed(0)
    model = PatchSVDD(emb_dim=16).to(CUDA)
    data = load_category(index_category(tiny_root, "fabric"))
    result = evaluate_category(model, data, mode="exact", with_aupro=False)
    assert all(v is None or 0.0 <= v <= 1.0 for v in result.metrics.values())
    assert result.scores.maps["sum"].device.type == "cpu"  # maps come back to the host for metrics and plots
