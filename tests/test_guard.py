"""The site guard without processes: what this project sends passes; code sent by value, unexpected calls,
templates, files, settings, weights and requirements are refused with a sentence (guard.py).

The archives here are packed by OpenFL's own ``FLExperiment`` code (plan and pickles), exactly as
``experiment.start`` packs them before sending; the real envoys' side is ``test_site_guard.py``.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import pytest
import torch
import yaml
from openfl.interface.interactive_api.experiment import FLExperiment, ModelInterface

from patchsvdd.federated import client, guard, tasks
from patchsvdd.federated.guard import ExperimentRefused, SitePolicy
from patchsvdd.models.registry import build_model
from patchsvdd.settings import ExperimentSettings, SettingsError, checked_settings

POLICY = SitePolicy(director_host="localhost", tls=False)
SETTINGS = ExperimentSettings(emb_dim=8)


class StandInFederation:
    """What ``FLExperiment`` reads of a federation while it writes the plan (no director is asked here)."""

    director_node_fqdn = "localhost"
    tls = False

    def get_shard_registry(self) -> dict:
        return {}


def pack(folder: Path, arguments: dict[str, Any], requirements: bool = False) -> Path:
    """The archive OpenFL's ``FLExperiment.start`` would send for ``arguments`` (what ``experiment_arguments``
    gives), with this project's empty requirements unless ``requirements`` (then OpenFL's pip freeze)."""
    arguments = dict(arguments)
    with client.working_folder(folder):
        experiment = FLExperiment(federation=StandInFederation(), experiment_name="x")
        experiment._prepare_plan(
            arguments["model_provider"],
            arguments["data_loader"],
            arguments["rounds_to_train"],
            delta_updates=False,
            opt_treatment=arguments["opt_treatment"],
            device_assignment_policy=arguments["device_assignment_policy"],
            override_config=arguments["override_config"],
        )
        if requirements:
            (folder / "requirements.txt").write_text("numpy==2.0\nsomething-else==1.0\n")
        else:
            (folder / "requirements.txt").write_text(client.NO_REQUIREMENTS)
        with client.no_requirements() if not requirements else _keep():
            experiment.prepare_workspace_distribution(
                arguments["model_provider"],
                arguments["task_keeper"],
                arguments["data_loader"],
                arguments["task_assigner"],
            )
        return Path(experiment.arch_path)


class _keep:
    def __enter__(self):  # OpenFL's own requirements: the client's pip freeze, kept as written above
        from openfl.interface.interactive_api import experiment as module

        self.module, self.original = module, module.dump_requirements_file
        module.dump_requirements_file = lambda *a, **k: None

    def __exit__(self, *exc):
        self.module.dump_requirements_file = self.original


def training(kind: str = "patchsvdd") -> dict[str, Any]:
    settings = replace(SETTINGS, model=kind)
    task_set = tasks.training_tasks(settings)
    return client.experiment_arguments(
        build_model(kind, emb_dim=8), settings, task_set, 3, tasks.TrainThenValidate(task_set, 2)
    )


def rewrite(archive: Path, name: str, data: bytes) -> Path:
    """A copy of ``archive`` with member ``name`` replaced (or added)."""
    out = archive.with_name(f"changed_{archive.name}")
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(out, "w") as target:
        for member in source.infolist():
            if member.filename != name:
                target.writestr(member, source.read(member))
        target.writestr(name, data)
    return out


def plan_of(archive: Path) -> dict:
    with zipfile.ZipFile(archive) as bundle:
        return yaml.safe_load(bundle.read(guard.PLAN_FILE))


@pytest.mark.parametrize("kind", ["patchsvdd", "autoencoder"])
def test_the_projects_training_experiment_passes(tmp_path: Path, kind: str) -> None:
    archive = pack(tmp_path / "ws", training(kind))
    assert guard.review_archive(str(archive), POLICY) == []


def test_the_projects_evaluation_and_export_experiments_pass(tmp_path: Path) -> None:
    model = build_model("patchsvdd", emb_dim=8)
    for i, task_set in enumerate(
        [
            tasks.evaluation_tasks(SETTINGS, ["good", "crack"]),
            tasks.evaluation_tasks(SETTINGS),
            tasks.export_tasks("bundle-1", 0.5, 0.01),
        ]
    ):
        archive = pack(tmp_path / f"ws{i}", client.experiment_arguments(model, SETTINGS, task_set, 1))
        assert guard.review_archive(str(archive), POLICY) == []


def test_openfls_own_task_registration_is_code_sent_by_value(tmp_path: Path) -> None:
    """The reason for ProjectTasks: OpenFL's wrapper closure travels by value and is refused."""
    from openfl.interface.interactive_api.experiment import TaskInterface

    plain = TaskInterface()
    plain.add_kwargs(settings=SETTINGS)(tasks.train_task)
    plain.register_fl_task(
        model="model", data_loader="train_data", device="device", optimizer="optimizer", round_num="round_num"
    )(tasks.train_task)
    with pytest.raises(ExperimentRefused, match=r"its tasks is code sent by the client \(by value\)"):
        guard.restricted_loads(cloudpickle.dumps(plain.task_registry), "its tasks")


class ByValueLoader(tasks.MVTecDataInterface):
    """A data interface the client defines itself (here: registered to travel by value, as __main__ code does)."""


def _by_value(obj: Any) -> bytes:
    import sys

    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    try:
        return cloudpickle.dumps(obj)
    finally:
        cloudpickle.unregister_pickle_by_value(module)


def test_a_data_interface_sent_by_value_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ExperimentRefused, match=r"its data interface is code sent by the client \(by value\)"):
        guard.restricted_loads(_by_value(ByValueLoader()), "its data interface")


def test_a_function_sent_by_value_is_refused() -> None:
    def steal(**kwargs):  # a local function: cloudpickle sends its code
        return {}

    with pytest.raises(ExperimentRefused, match="by value"):
        guard.restricted_loads(cloudpickle.dumps(steal), "its tasks")


class CallsOnLoad:
    def __init__(self, target: str, args: tuple) -> None:
        self.target, self.args = target, args

    def __reduce__(self):
        module, name = self.target.rsplit(".", 1)
        return getattr(__import__(module, fromlist=[name]), name), self.args


@pytest.mark.parametrize(
    "target",
    [
        "os.system",
        "builtins.eval",
        "builtins.exec",
        "builtins.getattr",
        "subprocess.Popen",
        "socket.create_connection",
        "builtins.__import__",
    ],
)
def test_a_pickle_that_calls_a_function_when_loaded_is_refused(tmp_path: Path, target: str) -> None:
    marker = tmp_path / "marker"
    with pytest.raises(ExperimentRefused, match="needs"):
        guard.restricted_loads(pickle.dumps(CallsOnLoad(target, (f"touch {marker}",))), "its model")
    assert not marker.exists()


def test_a_pickle_may_not_call_what_it_may_only_name() -> None:
    """The tasks may be referred to, never called while loading (REDUCE), nor patched (BUILD on a function)."""
    call = pickle.dumps(CallsOnLoad("patchsvdd.federated.tasks.export_task", ()))
    with pytest.raises(ExperimentRefused, match="calls export_task while it is loaded"):
        guard.restricted_loads(call, "its model")
    # a class's __init__ through the old INST opcode (protocol 0), and state set on a class object
    inst = b"(ipatchsvdd.models.patchsvdd.network\nPatchSVDD\n(dp0\nb."
    with pytest.raises(ExperimentRefused, match="protocol 0/1"):
        guard.restricted_loads(inst, "its model")
    from patchsvdd.models.patchsvdd.network import PatchSVDD

    forward = PatchSVDD.forward
    # setattr(cls, ...) through BUILD on the class itself
    build_on_class = b"\x80\x04cpatchsvdd.models.patchsvdd.network\nPatchSVDD\nN}\x8c\x07forward\x8c\x01xs\x86b."
    with pytest.raises(ExperimentRefused, match="sets the state of a type"):
        guard.restricted_loads(build_on_class, "its model")
    assert PatchSVDD.forward is forward


def test_torch_storages_are_read_by_the_weights_only_loader() -> None:
    """``torch.storage._load_from_bytes`` would run ``torch.load(weights_only=False)`` on bytes the client chose."""
    tensor = torch.randn(3, 4)
    assert torch.equal(guard.restricted_loads(pickle.dumps(tensor)), tensor)
    inner = pickle.dumps(CallsOnLoad("os.system", ("true",)))
    crafted = pickle.dumps(CallsOnLoad("torch.storage._load_from_bytes", (inner,)))
    with pytest.raises(ExperimentRefused, match="cannot be loaded safely"):
        guard.restricted_loads(crafted, "its model")


def _hooked(*_: Any) -> None:
    return None


def test_models_with_hooks_or_other_shapes_are_refused() -> None:
    model = build_model("patchsvdd", emb_dim=8)
    assert guard.check_model(guard.restricted_loads(pickle.dumps(model))) == "patchsvdd"
    hooked = build_model("patchsvdd", emb_dim=8)
    hooked.register_forward_hook(_hooked)
    with pytest.raises(ExperimentRefused, match="hooks"):
        guard.check_model(hooked)
    big = build_model("patchsvdd", emb_dim=8)
    big.emb_dim = 10**6
    with pytest.raises(ExperimentRefused, match="emb_dim is 1000000"):
        guard.check_model(big)
    odd = build_model("patchsvdd", emb_dim=8)
    odd.register_buffer("extra", torch.zeros(2))
    with pytest.raises(ExperimentRefused, match="'extra'"):
        guard.check_model(odd)


def test_weights_from_the_aggregator_must_be_the_models_arrays() -> None:
    model = build_model("autoencoder")
    arrays = {k: v.numpy() for k, v in model.state_dict().items()}
    guard.check_weights(model, arrays)
    key = next(iter(arrays))
    with pytest.raises(ExperimentRefused, match=f"'{key}'"):
        guard.check_weights(model, {**arrays, key: np.zeros(3, dtype=np.float32)})
    with pytest.raises(ExperimentRefused, match="str"):
        guard.check_weights(model, {**arrays, key: "not an array"})


def test_settings_are_checked_at_the_site() -> None:
    assert checked_settings(SETTINGS) == SETTINGS
    for field, value, message in [
        ("rounds", 0, "at least one round"),
        ("lr", "0.1", "settings.lr is '0.1'"),
        ("batch_size", True, "settings.batch_size is True"),
        ("holdout_fraction", float("nan"), "not finite|holdout_fraction"),
    ]:
        bad = ExperimentSettings()
        object.__setattr__(bad, field, value)  # what an unpickled object can hold: no __post_init__ ran
        with pytest.raises(SettingsError, match=message):
            checked_settings(bad)
        with pytest.raises(ExperimentRefused, match="train_task gets"):
            guard.check_task_settings("train_task", {"settings": bad})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "../../etc/cron.d/x", "bank_fraction": 1.0, "max_fpr": None}, "name="),
        ({"name": "ok", "bank_fraction": 2.0, "max_fpr": None}, "bank_fraction="),
        ({"name": "ok", "bank_fraction": 1.0, "max_fpr": None, "command": "rm"}, "command="),
    ],
)
def test_export_settings_are_checked_at_the_site(kwargs: dict, message: str) -> None:
    with pytest.raises(ExperimentRefused, match=message):
        guard.check_task_settings("export_task", kwargs)


def test_plans_build_only_this_projects_components(tmp_path: Path) -> None:
    archive = pack(tmp_path / "ws", training())
    honest = plan_of(archive)
    guard.check_plan(honest, POLICY)
    cases = [
        (
            ("compression_pipeline", "template"),
            "subprocess.Popen",
            r"builds 'subprocess.Popen' for compression_pipeline",
        ),
        (("task_runner", "template"), "evil.Runner", "builds 'evil.Runner'"),
        (("api_layer", "required_plugin_components", "serializer_plugin"), "pickle.Unpickler", "pickle.Unpickler"),
        (("network", "settings", "agg_addr"), "elsewhere.example", "sends this site's updates to 'elsewhere.example'"),
        (("network", "settings", "use_tls"), True, "use_tls True"),
        (("collaborator", "defaults"), "plan/defaults/x.yaml", "defaults file"),
        (("data_loader", "settings", "data_path"), "/etc", "data_loader settings"),
    ]
    for path, value, message in cases:
        plan = yaml.safe_load(yaml.safe_dump(honest))
        node = plan
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
        with pytest.raises(ExperimentRefused, match=message):
            guard.check_plan(plan, POLICY)
        with pytest.raises(ExperimentRefused, match=message):  # and so the whole archive
            guard.review_archive(str(rewrite(archive, guard.PLAN_FILE, yaml.safe_dump(plan).encode())), POLICY)


def test_code_files_and_odd_paths_in_the_archive_are_refused(tmp_path: Path) -> None:
    archive = pack(tmp_path / "ws", training())
    for name, message in [
        ("patchsvdd/__init__.py", "a Python file 'patchsvdd/__init__.py'"),
        ("sitecustomize.pyc", "Python file"),
        ("run.sh", "a file 'run.sh'"),
        ("../outside.json", "outside the experiment's folder"),
    ]:
        with pytest.raises(ExperimentRefused, match=message):
            guard.review_archive(str(rewrite(archive, name, b"import os\n")), POLICY)
    with pytest.raises(ExperimentRefused, match="not a zip file"):
        (tmp_path / "junk").write_bytes(b"not a zip")
        guard.review_archive(str(tmp_path / "junk"), POLICY)


def test_each_pickle_is_reviewed_with_its_role(tmp_path: Path) -> None:
    archive = pack(tmp_path / "ws", training())
    for name, role in [
        ("loader_obj.pkl", "its data interface"),
        ("model_obj.pkl", "its model"),
        ("task_assigner_obj.pkl", "its task assigner"),
        ("aggregation_function_obj.pkl", "its aggregation functions"),
    ]:
        changed = rewrite(archive, name, _by_value(ByValueLoader()))
        with pytest.raises(ExperimentRefused, match=f"{role} is code sent by the client"):
            guard.review_archive(str(changed), POLICY)
    # a well-formed object of the wrong kind in the right file
    wrong = rewrite(archive, "model_obj.pkl", pickle.dumps(tasks.MVTecDataInterface()))
    with pytest.raises(ExperimentRefused, match="not OpenFL's ModelInterface"):
        guard.review_archive(str(wrong), POLICY)


def test_requirements_are_refused_unless_the_site_allows_them(tmp_path: Path) -> None:
    archive = pack(tmp_path / "ws", training(), requirements=True)
    with pytest.raises(ExperimentRefused, match=r"asks to install 2 package\(s\) \(numpy==2.0, something-else==1.0\)"):
        guard.review_archive(str(archive), POLICY)
    allowing = replace(POLICY, install_requirements=True)
    assert guard.review_archive(str(archive), allowing) == ["numpy==2.0", "something-else==1.0"]


def test_the_optimizer_must_hold_the_models_own_weights(tmp_path: Path) -> None:
    model = build_model("patchsvdd", emb_dim=8)
    stranger = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))])
    interface = ModelInterface(model=model, optimizer=stranger, framework_plugin=guard.FRAMEWORK_ADAPTER)
    with pytest.raises(ExperimentRefused, match="not its model's weights"):
        guard.check_model_interface(guard.restricted_loads(cloudpickle.dumps(interface)))
    interface = ModelInterface(
        model=model, optimizer=torch.optim.Adam(model.parameters()), framework_plugin=guard.FRAMEWORK_ADAPTER
    )
    assert guard.check_model_interface(guard.restricted_loads(cloudpickle.dumps(interface))) == "patchsvdd"


def test_envoy_config_switches_are_read_only_when_true(tmp_path: Path) -> None:
    from patchsvdd.federated.fx import envoy_allows

    config = tmp_path / "shard.yaml"
    config.write_text("trust_client_code: yes-please\nparams:\n  install_requirements: 1\n")
    assert envoy_allows(["envoy", "start", "-ec", str(config)]) == {
        "trust_client_code": False,
        "install_requirements": False,
    }
    config.write_text("trust_client_code: true\nparams:\n  install_requirements: true\n")
    assert envoy_allows(["envoy", "start", "--envoy-config-path", str(config)]) == {
        "trust_client_code": True,
        "install_requirements": True,
    }
    assert not any(envoy_allows(["envoy", "start"]).values())


def test_shipped_shard_configs_never_trust_client_code() -> None:
    from patchsvdd.system.harness import project_root

    for config in (project_root() / "envoy_folder").glob("*.yaml"):
        content = yaml.safe_load(config.read_text())
        assert content.get("trust_client_code", False) is False, config
        assert content["params"]["install_requirements"] is False, config


def test_restricted_loads_is_what_openfl_restores_with_once_installed(tmp_path: Path) -> None:
    """install_site_guard replaces OpenFL's cloudpickle restore in the envoy process (run in a child here)."""
    import subprocess
    import sys

    path = tmp_path / "loader_obj.pkl"
    path.write_bytes(_by_value(ByValueLoader()))
    code = (
        "import sys; from patchsvdd.federated.guard import install_site_guard, ExperimentRefused\n"
        "from openfl.plugins.interface_serializer.cloudpickle_serializer import CloudpickleSerializer as S\n"
        "install_site_guard()\n"
        "try: S.restore_object(sys.argv[1])\n"
        "except ExperimentRefused as e: print('refused:', e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert "refused: its data interface is code sent by the client (by value)" in out.stdout, out.stderr


def test_unpickling_keeps_identity_of_shared_tensors() -> None:
    """Adam's parameters are the model's own after a restricted load (the check above relies on it)."""
    model = build_model("patchsvdd", emb_dim=8)
    optimizer = torch.optim.Adam(model.parameters())
    loaded_model, loaded_optimizer = guard.restricted_loads(io.BytesIO(cloudpickle.dumps((model, optimizer))).read())
    assert loaded_optimizer.param_groups[0]["params"][0] is next(loaded_model.parameters())
