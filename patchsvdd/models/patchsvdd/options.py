"""Patch SVDD's own options (standard library only: settings and sites read them without torch)."""

from __future__ import annotations

from dataclasses import dataclass, field

from patchsvdd.errors import SettingsError

EMB_DIM = 64  # D, the paper's embedding size
INIT_SCHEMES = ("kaiming", "pytorch")  # see network.initialise


@dataclass(frozen=True)
class PatchSVDDOptions:
    """``emb_dim``: D, the embedding size; ``init``: a fresh model's weights, 'kaiming' (He initialisation,
    spread embeddings, the project's default) or 'pytorch' (PyTorch's layer defaults, as the paper's code);
    ``lambda_svdd``: the weight of the SVDD loss beside the position loss (lambda)."""

    emb_dim: int = field(default=EMB_DIM, metadata={"help": "D, the embedding size"})
    init: str = field(
        default="kaiming", metadata={"help": "weights of a fresh model (paper: pytorch)", "choices": INIT_SCHEMES}
    )
    lambda_svdd: float = field(default=1e-3, metadata={"help": "weight of the SVDD loss, lambda"})

    def __post_init__(self) -> None:
        if not 1 <= self.emb_dim <= 4096:
            raise SettingsError(f"emb_dim={self.emb_dim}: from 1 to 4096")
        if self.init not in INIT_SCHEMES:
            raise SettingsError(f"init={self.init!r}: choose {', '.join(INIT_SCHEMES)}")
        if not self.lambda_svdd >= 0:
            raise SettingsError(f"lambda_svdd={self.lambda_svdd}: not negative")
