"""Where torch runs and whether bf16 autocast pays there: the CPU's flags decide, never oneDNN's word alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from patchsvdd import device as dev
from patchsvdd.training.loop import resolve_precision

CPU = torch.device("cpu")
# abridged /proc/cpuinfo of two x86 CPUs with AVX-512: with native bf16 (Sapphire Rapids) and without (Cascade Lake)
WITH_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile\n"
WITHOUT_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


def _cpuinfo(tmp_path: Path, text: str) -> Path:
    path = tmp_path / f"cpuinfo-{abs(hash(text))}"
    path.write_text(text)
    return path


@pytest.fixture
def onednn_says_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """oneDNN claims bf16, as it does on every AVX-512 CPU (emulated where the CPU lacks it), and no instruction-set
    cap of the environment (a run under ONEDNN_MAX_CPU_ISA=AVX2, as an AVX2-only CPU) decides before the flags."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    dev._cpu_bf16_support.cache_clear()
    yield
    dev._cpu_bf16_support.cache_clear()


def test_cpu_flags_read_x86_and_arm_lines(tmp_path: Path) -> None:
    assert "avx512_bf16" in dev.cpu_flags(_cpuinfo(tmp_path, WITH_BF16))
    assert dev.cpu_flags(_cpuinfo(tmp_path, ARM_BF16)) >= {"bf16", "sve"}
    assert dev.cpu_flags(tmp_path / "absent") is None
    assert dev.cpu_flags(_cpuinfo(tmp_path, "processor : 0\n")) is None


def test_timing_flags_name_the_flags_a_timing_depends_on(tmp_path: Path) -> None:
    assert dev.timing_flags(_cpuinfo(tmp_path, WITH_BF16)) == "amx_bf16, avx2, avx512_bf16, avx512_vnni, avx512f"
    assert dev.timing_flags(_cpuinfo(tmp_path, WITHOUT_BF16)) == "avx2, avx512_vnni, avx512f"
    assert dev.timing_flags(_cpuinfo(tmp_path, "processor\t: 0\nflags\t\t: fpu sse2\n")) == "none of note"
    assert dev.timing_flags(tmp_path / "absent") == "not readable"


def test_auto_is_bf16_only_where_the_cpu_has_it(
    tmp_path: Path, onednn_says_bf16: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_probe() -> tuple[bool, float, float]:
        raise AssertionError("flags were readable: no probe should run")

    monkeypatch.setattr(dev, "_bf16_probe_faster", no_probe)
    native = dev.bf16_support(CPU, _cpuinfo(tmp_path, WITH_BF16))
    assert native.native and "avx512_bf16" in native.reason and "amx_bf16" in native.reason
    emulated = dev.bf16_support(CPU, _cpuinfo(tmp_path, WITHOUT_BF16))
    assert not emulated.native and "emulated" in emulated.reason
    monkeypatch.setattr(dev, "CPUINFO", _cpuinfo(tmp_path, WITHOUT_BF16))
    assert resolve_precision("auto", CPU) is None
    assert resolve_precision("bf16", CPU) is torch.bfloat16  # asked for by name: given, even where emulated
    dev._cpu_bf16_support.cache_clear()
    monkeypatch.setattr(dev, "CPUINFO", _cpuinfo(tmp_path, WITH_BF16))
    assert resolve_precision("auto", CPU) is torch.bfloat16


def test_without_flags_a_timing_probe_decides(
    tmp_path: Path, onednn_says_bf16: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dev, "_bf16_probe_faster", lambda: (False, 0.010, 0.026))
    slow = dev.bf16_support(CPU, tmp_path / "no-cpuinfo")
    assert not slow.native and "10 ms in fp32 and 26 ms in bf16" in slow.reason
    dev._cpu_bf16_support.cache_clear()
    monkeypatch.setattr(dev, "_bf16_probe_faster", lambda: (True, 0.010, 0.004))
    assert dev.bf16_support(CPU, tmp_path / "no-cpuinfo").native


def test_the_probe_times_both_precisions_and_leaves_the_random_state() -> None:
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    faster, fp32, bf16 = dev._bf16_probe_faster(repeats=1)
    assert fp32 > 0 and bf16 > 0 and faster == (bf16 < 0.9 * fp32)
    assert torch.equal(torch.rand(3), expected)


def test_no_onednn_bf16_means_fp32(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    dev._cpu_bf16_support.cache_clear()
    try:
        assert not dev.bf16_support(CPU, _cpuinfo(tmp_path, WITH_BF16)).native
    finally:
        dev._cpu_bf16_support.cache_clear()


def test_cuda_asks_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    support = dev.bf16_support(torch.device("cuda"))
    assert not support.native and "Tesla V100" in support.reason
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert dev.bf16_support(torch.device("cuda")).native


def test_a_onednn_isa_cap_below_bf16_means_fp32(
    tmp_path: Path, onednn_says_bf16: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core_vnni")
    capped = dev.bf16_support(CPU, _cpuinfo(tmp_path, WITH_BF16))
    assert not capped.native and "ONEDNN_MAX_CPU_ISA=avx512_core_vnni" in capped.reason
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert dev.bf16_support(CPU, _cpuinfo(tmp_path, WITH_BF16)).native
