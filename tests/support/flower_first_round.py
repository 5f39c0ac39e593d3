"""One round of the project's experiment on a local Flower federation, for the test that runs the same round on
both engines (tests/test_engines_agree.py runs this in the Flower environment):

    .venv-flower/bin/python tests/support/flower_first_round.py DATA_ROOT CATEGORY OUT SETTINGS_JSON SEED

writes OUT/last.pt (experiment.train's) of a fresh Patch SVDD drawn with torch seed SEED.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from patchsvdd import experiment
from patchsvdd.federated.flower.driver import FlowerEngine
from patchsvdd.federated.flower.local import start_flower_federation
from patchsvdd.federated.local import Processes
from patchsvdd.models.registry import build_model
from patchsvdd.settings import settings_from_dict


def main(data_root: str, category: str, out: str, settings_json: str, seed: str) -> int:
    settings = settings_from_dict(json.loads(settings_json))
    with Processes() as processes:
        local = start_flower_federation(Path(out) / "run", Path(data_root), category, 2, processes=processes)
        engine = FlowerEngine.connect(local.superlink, Path(out) / "engine")
        try:
            engine.sites(2)
            torch.manual_seed(int(seed))
            model = build_model(settings.model, **settings.model_options)
            experiment.train(engine, model, settings, "same-round", Path(out), category=category)
        finally:
            engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
