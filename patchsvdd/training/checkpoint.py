"""Saving and loading checkpoints of either model (plain tensors and metadata, ``weights_only`` safe).

A checkpoint names its model ('patchsvdd' or 'autoencoder') and the numbers
that rebuild its shape; one without a name (written before the autoencoder
existed) is a Patch SVDD checkpoint.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from patchsvdd.errors import InputError
from patchsvdd.models.registry import family, family_of

FORMAT_VERSION = 1
_PLAIN_TYPES = (str, int, float, bool, type(None))


class CheckpointError(InputError):
    """A checkpoint file that is missing, unreadable or not a checkpoint of this project."""


def _check_metadata(value: Any, key: str) -> None:
    if isinstance(value, _PLAIN_TYPES):
        return
    if isinstance(value, (list, tuple)):
        for item in value:
            _check_metadata(item, key)
        return
    if isinstance(value, dict):
        for k, item in value.items():
            if not isinstance(k, str):
                raise TypeError(f"checkpoint metadata {key!r}: dictionary keys must be str, got {k!r}")
            _check_metadata(item, f"{key}.{k}")
        return
    raise TypeError(
        f"checkpoint metadata {key!r}: {type(value).__name__} is not a plain str/int/float/bool/list/dict value"
    )


def save_checkpoint(model: torch.nn.Module, path: str | os.PathLike, **metadata: Any) -> Path:
    """Write ``model``'s weights and plain ``metadata`` to ``path`` atomically.

    The file is written next to ``path`` and renamed over it, so a crash
    never leaves a half-written checkpoint. Returns the path.
    """
    for key, value in metadata.items():
        _check_metadata(value, key)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model_family = family_of(model)
    numbers = model_family.architecture(model)
    payload = {
        "format_version": FORMAT_VERSION,
        "model": model_family.name,
        "architecture": numbers,
        **(
            {"emb_dim": numbers["emb_dim"]} if "emb_dim" in numbers else {}
        ),  # what versions before the autoencoder read
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "metadata": dict(metadata),
    }
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`. Returns ``(model, metadata)``; the model is a
    network of the registered model the file names (``PatchSVDD``, ``ConvAutoencoder``, ...)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt file
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or "state_dict" not in payload:
        raise CheckpointError(f"{path}: not a checkpoint of this project (no state_dict)")
    kind = payload.get("model", "patchsvdd")
    numbers = payload.get("architecture") or ({"emb_dim": payload["emb_dim"]} if "emb_dim" in payload else None)
    if numbers is None:
        raise CheckpointError(f"{path}: not a checkpoint of this project (no architecture/emb_dim)")
    try:
        model = family(kind).from_architecture(numbers)
    except (InputError, TypeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: model {kind!r} with {numbers}: {exc}") from exc
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit {kind} {numbers}: {exc}") from exc
    return model, dict(payload.get("metadata", {}))
