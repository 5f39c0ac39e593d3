"""The authors' released Patch SVDD encoders: fetch (pinned and checked), map onto ``PatchSVDD``, save.

The original repository releases ``ckpts/<category>/enchier.pkl`` for each of
the 15 MVTec AD categories: a torch-saved state dict of the hierarchical
encoder (D=64) with keys ``enc.conv1..8.{weight,bias}`` (the K=32 encoder) and
``conv1``, ``conv2`` (the K=64 head). No position classifiers: those of the
imported model are freshly initialised. Files are read with
``torch.load(weights_only=True)``, so a file can never run code.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import torch

from patchsvdd.errors import InputError
from patchsvdd.models.patchsvdd.network import PatchSVDD

SOURCE_REPOSITORY = "nuclearboy95/Anomaly-Detection-PatchSVDD-PyTorch"
SOURCE_COMMIT = "934d6238e5e0ad511e2a0e7fc4f4899010e7d892"
DEFAULT_URL = f"https://raw.githubusercontent.com/{SOURCE_REPOSITORY}/{SOURCE_COMMIT}/ckpts/{{category}}/enchier.pkl"
EMB_DIM = 64
SHA256 = {  # of ckpts/<category>/enchier.pkl at SOURCE_COMMIT (1,611,136 bytes each)
    "bottle": "d8ba97a6a9a19ddfbbcef4a82f15061f5cfa8975fedff457f8b67a2841b69b9b",
    "cable": "5f8192a5f5b760ffeb55ad8485001e851ae5b24ef0794298b9885c8a76e11ada",
    "capsule": "7270e815cc57ee299790f0e0cda02cb3465f735caf705d5931cbebc4aa96b9bd",
    "carpet": "8ce68b109352bed66a6573b224bea86b528e476ec1303557c0bd12a9f660e0b4",
    "grid": "2f18de53c790cef78dfc1f94717bbefe057084389cf58a6ac71b8067b812e44a",
    "hazelnut": "145d20dd505b2086d739b3f3488750e1707a7d57296bfb344c5a12be9b116fc9",
    "leather": "23392e3655e80edf703bc03a9b628ee47b89dbda58609bb4388a9701f56f7074",
    "metal_nut": "1613fb112e3e32e6d568cec09bf4c689ffdf2b4deb29a7590aa6a620db1c9779",
    "pill": "480ff60a8c9c75d488304f3082cc009c8add300d89f7209f168c2a897035e3c6",
    "screw": "3b97375c7fb2495d536a1ac87bc3818c51d01eeb92cca1b6a1c78c77e3810999",
    "tile": "36098f5e46b35ee9ec9c6299d0860742c3c09aa65b1d1807db5cc0b440c18447",
    "toothbrush": "fd3ec1907d63df5fb6d4e6252bc68a0a17aaf7db4aa86bedca38c134c00c17d3",
    "transistor": "29d2ef7a5f00dd4d9a91221d102e0b70ef5441ecaa8837bda5e5ca2231dbfdab",
    "wood": "6785dd122b81502e4a1d689d41669d785b7f7130586cae3dd184a3b96b48a1d1",
    "zipper": "64dc960ea0012a58e450ac05426e75f192231249ae1e57db497653ea97614205",
}
CATEGORIES = tuple(SHA256)
DOWNLOAD_TIMEOUT = 60.0


class ReleasedWeightsError(InputError):
    """A released encoder that cannot be had or does not fit; the message names the file or URL and what is wrong."""


def key_map(model: PatchSVDD) -> dict[str, str]:
    """Released key -> this project's state-dict key, for every weight of the encoders."""
    mapping = {}
    convs = [
        name for name, module in model.encoder.small.layers.named_children() if isinstance(module, torch.nn.Conv2d)
    ]
    for number, index in enumerate(convs, start=1):
        for part in ("weight", "bias"):
            mapping[f"enc.conv{number}.{part}"] = f"encoder.small.layers.{index}.{part}"
    for released, ours in (("conv1", "combine"), ("conv2", "project")):
        for part in ("weight", "bias"):
            mapping[f"{released}.{part}"] = f"encoder.{ours}.{part}"
    return mapping


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> Path:
    """Where downloads are kept: ``$PATCHSVDD_CACHE`` or ``~/.cache/patchsvdd``."""
    return Path(os.environ.get("PATCHSVDD_CACHE") or Path.home() / ".cache" / "patchsvdd")


def _check_category(category: str) -> None:
    if category not in SHA256:
        raise ReleasedWeightsError(f"category {category!r}: released encoders exist for {', '.join(CATEGORIES)}")


def download(category: str, url: str | None = None, timeout: float = DOWNLOAD_TIMEOUT) -> Path:
    """The released file of ``category`` in the cache, downloaded (from ``url`` or the pinned commit) if absent.

    The file's SHA-256 must be the pinned one; a mismatch is deleted and raises.
    """
    _check_category(category)
    target = cache_dir() / "released" / category / "enchier.pkl"
    if target.is_file() and sha256_of(target) == SHA256[category]:
        return target
    url = url or DEFAULT_URL.format(category=category)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            shutil.copyfileobj(response, out)
        found = sha256_of(tmp)
        if found != SHA256[category]:
            raise ReleasedWeightsError(f"{url}: SHA-256 {found} is not the pinned {SHA256[category]} of {category}")
        os.replace(tmp, target)
    except (urllib.error.URLError, OSError) as exc:
        raise ReleasedWeightsError(
            f"cannot download {url} ({exc}). On a machine with internet, download that file, then pass it with "
            f"--source PATH or put it at {target}"
        ) from exc
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def read_released(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The released state dict from ``path`` (weights only: no code is unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise ReleasedWeightsError(f"{path}: file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for foreign or corrupt files
        raise ReleasedWeightsError(f"{path}: not a weights-only torch file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ReleasedWeightsError(f"{path}: not a state dict of tensors")
    return state


def to_model(state: dict[str, torch.Tensor], source: str = "state dict") -> PatchSVDD:
    """A ``PatchSVDD`` (D=64) holding the released encoder weights; classifiers freshly initialised."""
    model = PatchSVDD(emb_dim=EMB_DIM)
    ours = model.state_dict()
    mapping = key_map(model)
    missing = sorted(set(mapping) - set(state))
    unexpected = sorted(set(state) - set(mapping))
    if missing or unexpected:
        raise ReleasedWeightsError(
            f"{source}: keys missing {missing or 'none'}, unexpected {unexpected or 'none'} "
            "(expected enc.conv1..8 and conv1, conv2, each weight and bias)"
        )
    for released, key in mapping.items():
        if tuple(state[released].shape) != tuple(ours[key].shape):
            raise ReleasedWeightsError(
                f"{source}: {released} has shape {tuple(state[released].shape)}, expected {tuple(ours[key].shape)}"
            )
        ours[key] = state[released].float()
    model.load_state_dict(ours)
    return model


def import_released(category: str, source: str | os.PathLike | None = None) -> tuple[PatchSVDD, dict[str, Any]]:
    """(model, metadata) from the released encoder of ``category``.

    ``source``: a local file, an http(s) URL, or None for the pinned file
    (downloaded once into :func:`cache_dir`). Metadata: source, category,
    sha256 and whether it is the pinned file of that category.
    """
    _check_category(category)
    text = str(source) if source is not None else None
    if text is None or text.startswith(("http://", "https://")):
        path = download(category, text)
    else:
        path = Path(text)
    state = read_released(path)
    model = to_model(state, str(path))
    digest = sha256_of(path)
    return model, {
        "source": text or DEFAULT_URL.format(category=category),
        "file": str(path),
        "category": category,
        "sha256": digest,
        "pinned": digest == SHA256[category],
        "released_commit": SOURCE_COMMIT,
    }
