"""The same model on both engines: one round of the same seeds, settings and data through OpenFL (this
environment) and through Flower (its own environment, tests/support/flower_first_round.py); the aggregated
weights agree to float tolerance.

Why not bit for bit: Flower's aggregate is, bit for bit, FedAvg of the sites' training tasks redone in one
process (tests/flower/test_flower_federation.py); OpenFL's is not: at least 99.9 % of its numbers agree to
1e-6 and the rest are far closer to Flower's than to the sites' unweighted mean (tests/test_federation.py
meets the same in OpenFL alone). OpenFL 1.7.1 runs its collaborators' tasks through its own framework adapter
(model and Adam state passed through its tensor dictionary between tasks), where the last bits part; Adam's
first step is sign-like (m / sqrt(v) is +-1 for any gradient that is not zero), so a gradient within rounding
of zero can move a weight by a whole step.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from patchsvdd import experiment
from patchsvdd.federated.local import Processes
from patchsvdd.federated.openfl.local import start_federation
from patchsvdd.models.registry import build_model
from patchsvdd.settings import ExperimentSettings
from patchsvdd.system.probes import free_port
from patchsvdd.training.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
FLOWER_PY = Path(os.environ.get("PATCHSVDD_FLOWER_PY", REPO / ".venv-flower" / "bin" / "python"))
SEED = 1
ONE_ROUND = ExperimentSettings(
    rounds=1,
    repeat=1,
    max_steps=2,
    batch_size=4,
    warmup_steps=0,
    model_options={"emb_dim": 16},
    idle_timeout=300,
    precision="fp32",
)


def _flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([state[k].flatten().double() for k in sorted(state)])


@pytest.mark.skipif(not FLOWER_PY.is_file(), reason=f"no Flower environment at {FLOWER_PY} (make flower-install)")
def test_one_round_gives_the_same_aggregate_on_openfl_and_on_flower(fed_data: Path, tmp_path: Path) -> None:
    settings = ExperimentSettings(**{**ONE_ROUND.__dict__, "aggregator_port": free_port()})
    flower = subprocess.Popen(
        [str(FLOWER_PY), str(REPO / "tests" / "support" / "flower_first_round.py"), str(fed_data), "fabric",
         str(tmp_path / "flower"), json.dumps(settings.to_dict()), str(SEED)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    with Processes() as processes:
        nodes = start_federation(tmp_path / "openfl_run", fed_data, "fabric", 2, processes=processes)
        engine = experiment.connect("openfl", host=nodes.host, port=nodes.port)
        engine.sites(2)
        torch.manual_seed(SEED)
        model = build_model("patchsvdd", **settings.model_options)
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        experiment.train(engine, model, settings, "same-round", tmp_path / "openfl", category="fabric")
    output, _ = flower.communicate(timeout=600)
    assert flower.returncode == 0, output[-3000:]
    on_openfl, _ = load_checkpoint(tmp_path / "openfl" / "last.pt")
    on_flower, _ = load_checkpoint(tmp_path / "flower" / "last.pt")
    a, b, start = _flat(on_openfl.state_dict()), _flat(on_flower.state_dict()), _flat(initial)
    assert (a - start).norm() > 0  # both trained
    assert (a - b).abs().le(1e-6).double().mean() > 0.999
    assert (a - b).norm() < 0.05 * (a - start).norm()
