"""A hostile client of the director, for tests/test_site_guard.py: it speaks OpenFL's protocol directly.

    python tests/hostile_client.py ATTACK MARKER HOST PORT NAME [TIMES]

Each ATTACK starts from this project's honest experiment (its plan, its manifest, its initial weights) and
changes one thing; MARKER is a path the attack would write, or (traversal) the folder it would delete:

- ``traversal``: the experiment's name climbs out of the workspace (NAME is e.g. ``x/../../canary``); sent
  TIMES times (OpenFL rmtree-s the folder an experiment's name makes, before and after);
- ``state_path``: the plan's ``aggregator.settings.best_state_path`` is MARKER (the director writes the model
  there at the end of a round);
- ``client_auth``: the plan's ``network.settings.require_client_auth`` is false;
- ``exit``: the archive carries ``model_obj.pkl``, a pickle that calls ``sys.exit`` when it is loaded;
- ``loader``: OpenFL's own ``FLExperiment.start`` with a data interface of its own, sent by value, that
  copies the site's training images to MARKER (the archive carries OpenFL's five pickles);
- ``template``: the plan's collaborator is ``logging.basicConfig`` writing to MARKER;
- ``requirements``: a requirements.txt that asks the sites to install packages;
- ``batch``: the manifest's settings ask a batch of ten million pairs;
- ``weights``: the initial weights are of another shape than the manifest's model.

Prints one JSON line: the attack, the director's answer ("refused: <its reason>" where it refused at
submission, else the experiment's final status) and the seconds it took.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import time
import zipfile
from pathlib import Path

import grpc
import numpy as np
import yaml
from openfl.interface.interactive_api.experiment import DataInterface, FLExperiment, ModelInterface
from openfl.interface.interactive_api.federation import Federation

from patchsvdd.federated.openfl import client, tasks
from patchsvdd.federated.openfl.review import FRAMEWORK_ADAPTER, PlanValues, canonical_plan
from patchsvdd.federated.rounds import tagged
from patchsvdd.models.patchsvdd.network import PatchSVDD
from patchsvdd.settings import ExperimentSettings
from patchsvdd.system.probes import free_port

ATTACK, MARKER, HOST, PORT, NAME = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
TIMES = int(sys.argv[6]) if len(sys.argv) > 6 else 1
SETTINGS = ExperimentSettings(
    rounds=1,
    repeat=1,
    max_steps=1,
    batch_size=4,
    model_options={"emb_dim": 8},
    round_search="fast",
    aggregator_port=free_port(),
)


class _Exit:
    def __reduce__(self):
        return sys.exit, ()


EXIT_PICKLE = pickle.dumps(_Exit())  # a pickle that stops whatever process loads it (made here, never loaded)


class StealingLoader(DataInterface):
    """Copies the site's training images to MARKER as soon as the envoy hands it the shard."""

    @property
    def shard_descriptor(self):
        return self._shard_descriptor

    @shard_descriptor.setter
    def shard_descriptor(self, shard_descriptor):
        self._shard_descriptor = shard_descriptor
        train = shard_descriptor.get_dataset("train")
        np.save(MARKER, np.stack([train[i][0] for i in range(len(train))]))

    def get_train_loader(self, **kwargs):
        return None

    def get_valid_loader(self, **kwargs):
        return None

    def get_train_data_size(self):
        return 1

    def get_valid_data_size(self):
        return 1


def honest_parts() -> tuple[dict, dict, dict]:
    """The plan, the manifest (as JSON values) and the initial weights of this project's training experiment."""
    model = PatchSVDD(emb_dim=8)
    manifest = client.experiment_manifest(model, SETTINGS, "training")
    plan = canonical_plan(PlanValues(HOST, SETTINGS.aggregator_port, False, manifest.rounds_to_train, "CPU_ONLY"))
    weights = {key: value.numpy().copy() for key, value in tagged(model).state_dict().items()}
    return plan, json.loads(manifest.to_json()), weights


def send(federation: Federation, name: str, plan: dict, manifest: dict, weights: dict, extra: dict) -> str | None:
    """Pack and submit; the director's refusal (its reason), or None when it took the experiment."""
    archive = Path(f"{ATTACK}.zip").resolve()
    with zipfile.ZipFile(archive, "w") as out:
        out.writestr("plan/plan.yaml", yaml.safe_dump(plan))
        out.writestr("manifest.json", json.dumps(manifest))
        for member, data in extra.items():
            out.writestr(member, data)
    collaborators = [name for name, info in federation.get_shard_registry().items() if info["is_online"]]
    try:
        response = federation.dir_client.set_new_experiment(
            name=name, col_names=collaborators, arch_path=str(archive), initial_tensor_dict=weights
        )
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.PERMISSION_DENIED:
            raise
        return str(exc.details())
    return None if response.accepted else "not accepted"


def through_openfl(federation: Federation) -> bool:
    """The ``loader`` attack through OpenFL's own client code: its plan and its five pickles."""
    model = PatchSVDD(emb_dim=8)
    task_keeper = tasks.training_tasks(SETTINGS)
    experiment = FLExperiment(federation=federation, experiment_name=NAME)
    experiment.start(
        model_provider=ModelInterface(model=tagged(model), optimizer=None, framework_plugin=FRAMEWORK_ADAPTER),
        task_keeper=task_keeper,
        data_loader=StealingLoader(),
        rounds_to_train=SETTINGS.rounds + 1,
        task_assigner=tasks.TrainThenValidate(task_keeper, SETTINGS.rounds),
        override_config={"network.settings.agg_port": SETTINGS.aggregator_port},
    )
    return experiment.experiment_submitted


def attack(federation: Federation) -> str | None:
    """Run ATTACK; the director's refusal, or None when it took the experiment."""
    plan, manifest, weights = honest_parts()
    extra: dict[str, bytes] = {}
    if ATTACK == "loader":
        try:
            return None if through_openfl(federation) else "not accepted"
        except grpc.RpcError as exc:
            return str(exc.details())
    if ATTACK == "state_path":
        plan["aggregator"]["settings"]["best_state_path"] = MARKER
    elif ATTACK == "client_auth":
        plan["network"]["settings"]["require_client_auth"] = False
    elif ATTACK == "exit":
        extra["model_obj.pkl"] = EXIT_PICKLE
    elif ATTACK == "template":
        plan["collaborator"]["template"] = "logging.basicConfig"
        plan["collaborator"]["settings"]["filename"] = MARKER
    elif ATTACK == "requirements":
        extra["requirements.txt"] = b"numpy==2.0\nsomething-else==1.0\n"
    elif ATTACK == "batch":
        manifest["settings"]["batch_size"] = 10_000_000
    elif ATTACK == "weights":
        weights = {key: np.zeros((3,) + value.shape, np.float32) for key, value in weights.items()}
    elif ATTACK != "traversal":
        raise SystemExit(f"unknown attack {ATTACK!r}")
    answer = None
    for _ in range(TIMES):
        answer = send(federation, NAME, plan, manifest, weights, extra)
    return answer


def main() -> None:
    federation = Federation(client_id="intruder", director_node_fqdn=HOST, director_port=PORT, tls=False)
    workdir = Path(MARKER).parent / f"client_{ATTACK}"
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)
    started = time.monotonic()
    refusal = attack(federation)
    status = None if refusal is None else f"refused: {refusal}"
    while status is None or (status in ("pending", "in_progress") and time.monotonic() - started < 180):
        time.sleep(0.5)
        status = federation.dir_client.get_experiment_status(NAME).experiment_status or "unknown"
    print(json.dumps({"attack": ATTACK, "status": status, "seconds": round(time.monotonic() - started, 1)}), flush=True)


if __name__ == "__main__":
    main()
