"""Choosing where torch runs: CUDA when present, else the CPU."""

from __future__ import annotations

import torch

from .errors import InputError


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
