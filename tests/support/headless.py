"""One experiment without a notebook: ``python tests/support/headless.py SPEC.json`` (on a test host).

What the notebook does for a training run, from a JSON spec (``host``, ``port``, ``tls``: the keywords of
``connect``, ``envoys``: their names, ``name``, ``settings``: ``ExperimentSettings`` fields, ``workdir``):
connect to the director (waiting up to a minute for it), wait for the envoys, and train a fresh model with
``patchsvdd.experiment.train``, as the notebook does, printing every line it prints (one per round among
them). The last line is ``RESULT {json}``: ``finished`` (the validated rounds, the nodes of the final
metrics) or ``gave_up`` (the sentence why). Runs on a test host of its own (``testbed``) as the notebook's
machine.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from patchsvdd import experiment
from patchsvdd.federated.openfl.client import FederationError, connect
from patchsvdd.federated.openfl.engine import OpenFLEngine
from patchsvdd.models.registry import build_model
from patchsvdd.settings import ExperimentSettings

DIRECTOR_WAIT = 60.0  # seconds to wait for the director to answer
ENVOY_WAIT = 180.0  # seconds to wait for the envoys to be online


def result(**fields: Any) -> None:
    print(f"RESULT {json.dumps(fields)}", flush=True)


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    deadline = time.monotonic() + DIRECTOR_WAIT
    while True:
        try:
            client = connect(spec["host"], int(spec["port"]), **(spec.get("tls") or {}))
            break
        except FederationError as exc:
            if time.monotonic() > deadline:
                result(status="no_director", reason=str(exc))
                return 2
            time.sleep(1)
    engine = OpenFLEngine(client, registry_poll=1.0)
    engine.sites(len(spec["envoys"]), timeout=ENVOY_WAIT)
    settings = ExperimentSettings(**spec["settings"])
    torch.manual_seed(settings.seed)
    model = build_model(settings.model, **settings.model_options)
    start = time.monotonic()
    try:
        trained = experiment.train(engine, model, settings, spec["name"], Path(spec["workdir"]), category="testbed")
    except FederationError as exc:
        result(status="gave_up", reason=str(exc))
        return 0
    log = trained.log
    rounds = sorted({r["round"] for r in log.records if r["task_name"] == "aggregated_model_validate"})
    result(status="finished", rounds=rounds, nodes=sorted(log.final()), seconds=round(time.monotonic() - start, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
