"""A hostile client of the director, for tests/test_site_guard.py: OpenFL's API directly, not this project's client.

    python tests/hostile_client.py ATTACK MARKER HOST PORT NAME

Run as a script, so that what it defines belongs to ``__main__`` and cloudpickle sends it by value, code and
all, as it does for anything a notebook defines. Each ATTACK would write MARKER at the site if the envoy ran it:

- ``loader``: a data interface of its own that copies the site's training images to MARKER;
- ``tasks``: a training task of its own (by value) that writes MARKER;
- ``model``: a model whose pickle calls ``os.system`` when loaded;
- ``plan``: a plan whose collaborator (built at the sites only) is ``logging.basicConfig``, which opens MARKER
  as the envoy's log file (and then fails on the collaborator's settings);
- ``pipeline``: a plan whose compression pipeline (built by the director too) is ``subprocess.Popen`` of a
  shell command that writes MARKER;
- ``requirements``: this project's own objects, but the requirements.txt OpenFL writes (the client's pip
  freeze), which asks the site to install packages.

Prints one JSON line: the attack, the director's final status of the experiment ("not accepted" where the
director refused it at submission) and the seconds it took.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
from openfl.interface.interactive_api.experiment import DataInterface, FLExperiment, ModelInterface
from openfl.interface.interactive_api.federation import Federation

from patchsvdd.federated import client, tasks
from patchsvdd.models.patchsvdd.network import PatchSVDD
from patchsvdd.settings import ExperimentSettings

ATTACK, MARKER, HOST, PORT, NAME = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]


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


def stealing_task(model, train_data, optimizer, device, round_num):
    with open(MARKER, "w") as out:
        out.write(f"ran at the site with {type(train_data).__name__}")
    return {"train_loss": 0.0}


class BoobyTrappedModel(PatchSVDD):
    def __reduce__(self):
        return os.system, (f"touch {MARKER}",)


def main() -> None:
    settings = ExperimentSettings(rounds=1, repeat=1, max_steps=1, batch_size=4, emb_dim=8, round_search="fast")
    task_keeper = tasks.training_tasks(settings)
    if ATTACK == "tasks":
        task_keeper = tasks.ProjectTasks()
        task_keeper.register_fl_task(
            model="model", data_loader="train_data", device="device", optimizer="optimizer", round_num="round_num"
        )(stealing_task)
        task_keeper.register_fl_task(model="model", data_loader="val_data", device="device")(tasks.validate_task)
    arguments = client.experiment_arguments(
        PatchSVDD(emb_dim=8),
        settings,
        task_keeper,
        settings.rounds + 1,
        tasks.TrainThenValidate(task_keeper, settings.rounds),
    )
    if ATTACK == "model":  # copied by nobody here: a copy would call os.system in this process
        arguments["model_provider"] = ModelInterface(
            model=BoobyTrappedModel(emb_dim=8), optimizer=None, framework_plugin=client.FRAMEWORK_ADAPTER
        )
    if ATTACK == "loader":
        arguments["data_loader"] = StealingLoader()
    if ATTACK == "plan":
        arguments["override_config"] = {
            **arguments["override_config"],
            "collaborator.template": "logging.basicConfig",
            "collaborator.settings.filename": MARKER,
            "collaborator.settings.force": True,
        }
    if ATTACK == "pipeline":
        arguments["override_config"] = {
            **arguments["override_config"],
            "compression_pipeline.template": "subprocess.Popen",
            "compression_pipeline.settings.args": f"touch {MARKER}",
            "compression_pipeline.settings.shell": True,
        }
    federation = Federation(client_id="intruder", director_node_fqdn=HOST, director_port=PORT, tls=False)
    workdir = os.path.join(os.path.dirname(MARKER), f"client_{NAME}")
    os.makedirs(workdir, exist_ok=True)
    os.chdir(workdir)
    experiment = FLExperiment(federation=federation, experiment_name=NAME)
    started = time.monotonic()
    if ATTACK == "requirements":
        experiment.start(**arguments)  # OpenFL's own requirements.txt: the client's pip freeze
    else:
        with client.no_requirements():  # so that only the attack itself is what the site refuses
            experiment.start(**arguments)
    status = None if experiment.experiment_submitted else "not accepted"
    while status not in ("failed", "finished", "rejected", "not accepted") and time.monotonic() - started < 180:
        time.sleep(0.5)
        status = federation.dir_client.get_experiment_status(NAME).experiment_status
    print(json.dumps({"attack": ATTACK, "status": status, "seconds": round(time.monotonic() - started, 1)}), flush=True)


if __name__ == "__main__":
    main()
