"""Choosing where torch runs (CUDA when present, else the CPU) and whether bf16 autocast pays there."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from patchsvdd.errors import InputError


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """'auto' (or None) -> CUDA when available, else CPU; 'cpu', 'cuda', 'cuda:1' as given.

    Asking for CUDA on a machine without it raises a clear error instead of failing later.
    """
    if spec is None or str(spec) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {spec!r} asked for, but torch sees no CUDA GPU here; use 'auto' or 'cpu'")
    return device


# Flags in /proc/cpuinfo that mean bf16 arithmetic in hardware: x86 AVX-512 BF16 or AMX ('flags' line), Arm's
# BF16 extension ('Features' line). On other x86 CPUs with AVX-512, oneDNN accepts bf16 but emulates it, which
# trains several times slower than fp32 (docs/benchmarks.md, "Training step").
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
CPUINFO = Path("/proc/cpuinfo")
# oneDNN instruction-set caps (ONEDNN_MAX_CPU_ISA) below AVX512_CORE_BF16: oneDNN then emulates bf16 whatever the CPU
ISA_CAPS_WITHOUT_BF16 = frozenset({"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI"})


@dataclass(frozen=True)
class Bf16Support:
    """Whether bf16 autocast is worth using on a device (``native``) and why, in words (``reason``)."""

    native: bool
    reason: str


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str] | None:
    """The feature flags of the first CPU in ``cpuinfo`` (x86 'flags', Arm 'Features'); None where the file
    cannot be read or has no such line (not Linux)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return None


def timing_flags(cpuinfo: Path = CPUINFO) -> str:
    """The CPU flags a recorded timing depends on (native bf16, AVX-512, AVX2, VNNI), comma-separated, in words
    where ``cpuinfo`` cannot be read: for the benchmarks' first line."""
    flags = cpu_flags(cpuinfo)
    if flags is None:
        return "not readable"
    return ", ".join(sorted(flags & (NATIVE_BF16_FLAGS | {"avx512f", "avx2", "avx512_vnni"}))) or "none of note"


def _bf16_probe_faster(repeats: int = 3) -> tuple[bool, float, float]:
    """Time a K=32-encoder-sized convolution stack forward and backward in fp32 and under bf16 autocast on
    this CPU (best of ``repeats``, about a second in all): (bf16 at least 10 % faster, fp32 s, bf16 s)."""
    import time

    from torch import nn

    with torch.random.fork_rng(devices=[]):  # the caller's random state stays as it was
        net = nn.Sequential(
            nn.Conv2d(3, 64, 3, 2),
            nn.LeakyReLU(0.1),
            nn.Conv2d(64, 128, 3),
            nn.LeakyReLU(0.1),
            nn.Conv2d(128, 128, 3),
            nn.Tanh(),
        )
        x = torch.randn(64, 3, 32, 32).contiguous(memory_format=torch.channels_last)

    def best(dtype: torch.dtype | None) -> float:
        times = []
        for _ in range(repeats + 1):  # the first call warms oneDNN's kernel cache up
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                out = net(x)
            out.float().sum().backward()
            times.append(time.perf_counter() - start)
        return min(times[1:])

    fp32, bf16 = best(None), best(torch.bfloat16)
    return bf16 < 0.9 * fp32, fp32, bf16


@functools.cache
def _cpu_bf16_support(cpuinfo: Path, isa_cap: str) -> Bf16Support:
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return Bf16Support(False, "fp32: this torch build has no oneDNN bf16 on the CPU")
    if isa_cap.upper() in ISA_CAPS_WITHOUT_BF16:
        return Bf16Support(
            False, f"fp32: ONEDNN_MAX_CPU_ISA={isa_cap} keeps oneDNN below AVX512_CORE_BF16 (bf16 would be emulated)"
        )
    flags = cpu_flags(cpuinfo)
    if flags is not None:
        native = sorted(flags & NATIVE_BF16_FLAGS)
        if native:
            return Bf16Support(True, f"bf16: the CPU has native bf16 ({', '.join(native)} in {cpuinfo})")
        return Bf16Support(
            False,
            f"fp32: no avx512_bf16, amx_bf16 or bf16 flag in {cpuinfo}, so bf16 would be emulated (slower than fp32)",
        )
    faster, fp32, bf16 = _bf16_probe_faster()
    return Bf16Support(
        faster,
        f"{'bf16' if faster else 'fp32'}: no CPU flags to read; a timing probe took "
        f"{fp32 * 1e3:.0f} ms in fp32 and {bf16 * 1e3:.0f} ms in bf16",
    )


def bf16_support(device: torch.device, cpuinfo: Path | None = None) -> Bf16Support:
    """Whether bf16 autocast runs natively (so faster than fp32) on ``device``, and why.

    CUDA: the GPU reports bf16 (Ampere and newer). CPU: oneDNN has bf16 and the CPU's flags list native bf16
    (AVX-512 BF16, AMX or Arm BF16) and ONEDNN_MAX_CPU_ISA does not cap oneDNN below them; where no flags can be
    read (not Linux), a short timing probe decides,
    once per process. ``cpuinfo``: the file to read the flags from (default /proc/cpuinfo).
    """
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
        return Bf16Support(
            native,
            f"{'bf16' if native else 'fp32'}: torch.cuda.is_bf16_supported() is {native} "
            f"on {torch.cuda.get_device_name(device)}",
        )
    if device.type != "cpu":
        return Bf16Support(False, f"fp32: no bf16 check for device type {device.type!r}")
    return _cpu_bf16_support(CPUINFO if cpuinfo is None else Path(cpuinfo), os.environ.get("ONEDNN_MAX_CPU_ISA", ""))
