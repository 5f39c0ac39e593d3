"""The largest weight of a Patch SVDD, which SecAgg+'s clipping range must cover (docs/security.md, "Secure
aggregation"): fresh models of both initialisations, the authors' released encoder where it is at hand, and
any checkpoints given (for example the notebook's ``runs/notebook/best.pt`` after its default run).

    python benchmarks/bench_secagg_bounds.py [--released PATH] [CHECKPOINT ...]

Also prints the bound of one Adam step, lr (1 - beta1) / sqrt(1 - beta2), times the notebook's steps per round.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from patchsvdd.models.patchsvdd.released import read_released
from patchsvdd.models.registry import build_model
from patchsvdd.settings import ExperimentSettings
from patchsvdd.training.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]


def largest(state: dict[str, torch.Tensor]) -> float:
    """The largest absolute value among a state dict's floating-point tensors."""
    return max(float(t.abs().max()) for t in state.values() if torch.is_tensor(t) and t.is_floating_point())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="*", type=Path)
    parser.add_argument("--released", type=Path, default=REPO.parent / "shared" / "official" / "bottle_enchier.pkl")
    args = parser.parse_args()
    settings = ExperimentSettings()
    for init in ("kaiming", "pytorch"):
        torch.manual_seed(0)
        model = build_model("patchsvdd", **{**settings.model_options, "init": init})
        dim = settings.options().emb_dim
        print(f"fresh Patch SVDD (D={dim}, init {init}): largest |weight| {largest(model.state_dict()):.3f}")
    if args.released.is_file():
        print(f"the authors' released encoder ({args.released.name}): {largest(read_released(args.released)):.3f}")
    else:
        print(f"(no released encoder at {args.released})")
    for path in args.checkpoints:
        model, _ = load_checkpoint(path)
        print(f"{path}: {largest(model.state_dict()):.3f}")
    beta1, beta2 = 0.9, 0.999  # torch.optim.Adam's defaults, which training uses
    step = settings.lr * (1 - beta1) / math.sqrt(1 - beta2)
    print(
        f"one Adam step moves a weight by at most about {step:.2e}; a round of the notebook's "
        f"{settings.max_steps} steps at lr {settings.lr:g}: {step * (settings.max_steps or 0):.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
