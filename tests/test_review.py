"""The review of what a client sends, without processes: this project's own experiments pass; names, plan keys,
manifest values, archive members, requirements and weights of any other kind are refused with a sentence; a
site builds what it runs from its own code (names.py, review.py, manifest.py, site_build.py, site_guard.py).
The real processes: tests/test_site_guard.py; the seeded fuzz campaign: tests/test_review_fuzz.py.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from fuzz_archives import HOST, Submission, honest, model_proto
from openfl.interface.aggregation_functions import WeightedAverage
from openfl.interface.interactive_api.experiment import ModelInterface

from patchsvdd.errors import SettingsError
from patchsvdd.federated import site_model
from patchsvdd.federated.manifest import MANIFEST_FILE, SITE_LIMITS, experiment_manifest, parse_manifest
from patchsvdd.federated.names import ExperimentRefused, check_name, child
from patchsvdd.federated.openfl import client, site_build, site_guard
from patchsvdd.federated.openfl.engine import OpenFLEngine
from patchsvdd.federated.openfl.review import (
    MAX_PLAN_DEPTH,
    PLAN_FILE,
    PlanValues,
    SitePolicy,
    canonical_plan,
    parse_plan,
    plan_values,
    review_archive,
)
from patchsvdd.federated.openfl.tasks import MVTecDataInterface, ProjectTasks, TrainThenValidate
from patchsvdd.models.registry import build_model
from patchsvdd.settings import ExperimentSettings
from patchsvdd.system.configs import ConfigError, check_director_config, check_envoy_config

ENVOY = SitePolicy(director_host=HOST, tls=False)
DIRECTOR = SitePolicy(director_host=None, tls=None)


def review(sub: Submission, tmp_path: Path, policy: SitePolicy = ENVOY):
    return review_archive(str(sub.write(tmp_path / "a.zip")), policy)


def refused(sub: Submission, tmp_path: Path, match: str, policy: SitePolicy = ENVOY) -> None:
    with pytest.raises(ExperimentRefused, match=match):
        review(sub, tmp_path, policy)


def with_plan(sub: Submission, plan: dict) -> Submission:
    return Submission(sub.name, {**sub.members, PLAN_FILE: yaml.safe_dump(plan).encode()}, sub.weights)


def with_manifest(sub: Submission, manifest: dict) -> Submission:
    return Submission(sub.name, {**sub.members, MANIFEST_FILE: json.dumps(manifest).encode()}, sub.weights)


# --- this project's own experiments ------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["training", "evaluation", "export"])
@pytest.mark.parametrize("model", ["patchsvdd", "autoencoder"])
def test_the_projects_own_experiments_pass_and_the_site_builds_them(tmp_path: Path, task: str, model: str) -> None:
    sub = honest(task, model)
    accepted = review(sub, tmp_path)
    assert accepted.manifest.task == task and accepted.packages == () and set(sub.members) == {PLAN_FILE, MANIFEST_FILE}
    _, weights = site_guard.review_submission(sub.write(tmp_path / "b.zip"), model_proto(sub.weights), DIRECTOR)
    assert set(weights) == set(sub.weights)
    objects = site_build.SiteObjects.build(accepted.manifest)
    interface = objects.by_file("model_obj.pkl")
    assert type(interface) is ModelInterface and type(interface.optimizer) is torch.optim.Adam
    assert {k: tuple(v.shape) for k, v in interface.model.state_dict().items()} == {
        k: v.shape for k, v in sub.weights.items()
    }
    assert all(not v.any() for v in interface.model.state_dict().values())  # zeros until the aggregator's come
    assert type(objects.by_file("tasks_obj.pkl")) is ProjectTasks
    assert type(objects.by_file("loader_obj.pkl")) is MVTecDataInterface
    assigner = objects.by_file("task_assigner_obj.pkl")
    assert type(assigner) is TrainThenValidate and assigner.training_rounds == (2 if task == "training" else 0)
    assert objects.by_file("aggregation_function_obj.pkl").default_factory is WeightedAverage
    with pytest.raises(ExperimentRefused, match="never restores"):
        objects.by_file("../evil.pkl")


def test_the_plan_is_the_one_openfls_own_client_writes(tmp_path: Path) -> None:
    """canonical_plan is OpenFL 1.7.1's interactive-API plan of this project's experiments, key for key."""
    from openfl.interface.interactive_api.experiment import FLExperiment

    class NoDirector:
        director_node_fqdn, tls = HOST, False

        def get_shard_registry(self) -> dict:
            return {}

    network = site_model.site_model(parse_manifest(honest().members[MANIFEST_FILE]))
    for port in (50051, None):
        with client.working_folder(tmp_path / str(port)):
            experiment = FLExperiment(federation=NoDirector(), experiment_name="x")
            interface = ModelInterface(model=network, optimizer=None, framework_plugin=site_build.FRAMEWORK_ADAPTER)
            override = {} if port is None else {"network.settings.agg_port": port}
            experiment._prepare_plan(interface, MVTecDataInterface(), 3, False, "CONTINUE_LOCAL", "CPU_ONLY", override)
        expected = canonical_plan(PlanValues(HOST, port or "auto", False, 3, "CPU_ONLY"))
        assert experiment.plan.config == expected


# --- names -------------------------------------------------------------------------------------------------------

BAD_NAMES = ["x/../../canary", "/etc", "..", ".", "a..b", "-x", "a\x00b", "a\nb", "a\tb", "a b", "x" * 101, "", "é", 7]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_names_that_traverse_or_hide_anything_are_refused(tmp_path: Path, name: object) -> None:
    with pytest.raises(ExperimentRefused, match="is not a plain name"):
        check_name(name, "its experiment name")
    with pytest.raises(ExperimentRefused, match="is not a plain name"):
        child(tmp_path, name, "its bundle name")


def test_a_name_may_not_lead_through_a_link(tmp_path: Path) -> None:
    (tmp_path / "outside").mkdir()
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "run-1").symlink_to(tmp_path / "outside")
    with pytest.raises(ExperimentRefused, match="leads outside"):
        child(tmp_path / "root", "run-1", "its experiment name")
    assert child(tmp_path / "root", "run-2", "x") == (tmp_path / "root" / "run-2").resolve()


def test_openfls_workspace_deletes_what_a_traversing_name_names_and_the_sites_refuses(tmp_path: Path) -> None:
    """The control: OpenFL's own ExperimentWorkspace rmtree-s the folder the name climbs to (the second time),
    the site's workspace refuses the name before touching anything, and a colliding name meets no folder."""
    from openfl.utilities.workspace import ExperimentWorkspace

    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "keep.txt").write_text("mine")
    site = tmp_path / "site"
    site.mkdir()
    archive = honest().write(tmp_path / "a.zip")
    previous = Path.cwd()
    os.chdir(site)
    try:
        for _ in range(2):
            with pytest.raises(ExperimentRefused, match="is not a plain name"):
                site_guard.site_workspace(site / "experiments")("x/../../canary", archive, remove_archive=False)
        (site / "canary").mkdir()  # a folder of the site's own, named as an experiment will be
        (site / "canary" / "keep.txt").write_text("mine")
        with site_guard.site_workspace(site / "experiments")("canary", archive, remove_archive=False):
            assert Path.cwd() == site / "experiments" / "canary" and Path(PLAN_FILE).is_file()
            assert Path("save").is_dir() and str(Path.cwd()) not in os.sys.path
        assert (site / "canary" / "keep.txt").read_text() == "mine" and canary.is_dir()
        for _ in range(2):  # OpenFL's own, for the same name: the canary goes
            try:
                with ExperimentWorkspace("x/../../canary", archive, remove_archive=False):
                    pass
            except FileExistsError:
                pass
    finally:
        os.chdir(previous)
    assert not canary.exists()


# --- the plan ----------------------------------------------------------------------------------------------------


def _set(plan: dict, dotted: str, value: object) -> dict:
    plan = json.loads(json.dumps(plan))
    node = plan
    *parents, last = dotted.split(".")
    for key in parents:
        node = node[key]
    node[last] = value
    return plan


PLAN_ATTACKS = {
    "aggregator.settings.best_state_path": ("/tmp/x.pbuf", "sets aggregator.settings.best_state_path to '/tmp"),
    "aggregator.settings.last_state_path": ("../../x", "sets aggregator.settings.last_state_path"),
    "aggregator.settings.single_col_cert_common_name": ("site", "'aggregator.settings.single_col_cert_common_name'"),
    "network.settings.require_client_auth": (False, "sets network.settings.require_client_auth to False"),
    "network.settings.cert_folder": ("/etc", "sets network.settings.cert_folder"),
    "collaborator.template": ("logging.basicConfig", "sets collaborator.template to 'logging.basicConfig'"),
    "compression_pipeline.template": ("subprocess.Popen", "sets compression_pipeline.template"),
    "api_layer.settings.model_interface_file": ("/etc/passwd", "sets api_layer.settings.model_interface_file"),
    "aggregator.settings.rounds_to_train": (10**9, "asks 1000000000 rounds"),
    "network.settings.agg_addr": ("0.0.0.0; rm", "is not a host name"),
    "network.settings.agg_port": (22, "is not 'auto' or a port"),
    "collaborator.settings.device_assignment_policy": ("ANY", "device policy 'ANY'"),
    "aggregator.defaults": ("plan/defaults/aggregator.yaml", "'aggregator.defaults'"),
}


@pytest.mark.parametrize("key", list(PLAN_ATTACKS))
def test_every_plan_key_is_the_projects_own(tmp_path: Path, key: str) -> None:
    sub = honest()
    value, reason = PLAN_ATTACKS[key]
    refused(with_plan(sub, _set(sub.plan, key, value)), tmp_path, reason, DIRECTOR)


def test_the_plan_must_send_updates_to_this_sites_director_with_its_tls(tmp_path: Path) -> None:
    plan = honest().plan
    with pytest.raises(ExperimentRefused, match="not to this envoy's director 'director.example'"):
        plan_values(plan, SitePolicy(director_host="director.example", tls=False))
    with pytest.raises(ExperimentRefused, match="this envoy speaks TLS"):
        plan_values(plan, SitePolicy(director_host=HOST, tls=True))
    assert plan_values(plan, SitePolicy(director_host=HOST.upper(), tls=False)).agg_addr == HOST


def test_plans_that_cost_more_than_their_size_are_refused_fast() -> None:
    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(18)
    )
    started = time.monotonic()
    with pytest.raises(ExperimentRefused, match="anchors or aliases"):
        parse_plan(laughs.encode())
    assert time.monotonic() - started < 1.0  # a tree walk of the aliases would take hours
    with pytest.raises(ExperimentRefused, match=f"nests deeper than {MAX_PLAN_DEPTH}"):
        parse_plan(("[" * 50 + "]" * 50).encode())
    with pytest.raises(ExperimentRefused, match="more than"):
        parse_plan(b"a: 1\n" * 10_000)
    with pytest.raises(ExperimentRefused, match="not ASCII"):
        parse_plan("a: 'é'\n".encode("latin-1"))
    with pytest.raises(ExperimentRefused, match="YAML tag"):
        parse_plan(b"a: !!python/object/apply:os.system ['touch x']\n")


# --- the manifest ------------------------------------------------------------------------------------------------

MANIFEST_ATTACKS = [
    (("settings", "batch_size"), 10_000_000, "batch_size=10000000, more than a site runs"),
    (("settings", "repeat"), 10**9, "repeat=1000000000"),
    (("settings", "max_steps"), 10**8, "max_steps=100000000"),
    (("settings", "lr"), "1e-3", "settings.lr is '1e-3', not of type float"),
    (("settings", "rounds"), 1, "training rounds|asks 2 rounds"),
    (("settings", "model"), "autoencoder", "autoencoder has no option 'emb_dim'"),
    (("settings", "model_options"), {"emb_dim": "8"}, "emb_dim of patchsvdd is '8', not of type int"),
    (("settings", "model_options"), {"emb_dim": 8, "__class__": 1}, "has no option '__class__'"),
    (("settings", "model_options"), [["emb_dim", 8]], "model_options is .*not a mapping"),
    (("settings", "model_options"), {"init": "os.system"}, "init='os.system': choose"),
    (("architecture", "emb_dim"), 10**6, "emb_dim is 1000000"),
    (("architecture", "emb_dim"), True, "emb_dim is True"),
    (("model",), "os", "its model is 'os'"),
    (("task",), "shell", "task is 'shell'"),
    (("format",), "patchsvdd-experiment/2", "format"),
    (("training_rounds",), 5, "training rounds"),
    (("defect_types",), ["good"], "lists defect types for training"),
    (("export",), {"name": "../x", "bank_fraction": 1.0, "max_fpr": None}, "export is"),
]


@pytest.mark.parametrize(("path", "value", "reason"), MANIFEST_ATTACKS)
def test_every_manifest_value_is_checked(tmp_path: Path, path: tuple, value: object, reason: str) -> None:
    sub = honest()
    manifest = json.loads(json.dumps(sub.manifest))
    node = manifest
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    refused(with_manifest(sub, manifest), tmp_path, reason)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (b'{"format": 1, "format": 2}', "repeats the key 'format'"),
        (b'{"settings": NaN}', "not a number"),
        (b"[" * 100_000, "more than|not ASCII JSON"),
        ('{"é": 1}'.encode(), "not ASCII JSON"),
        (b'{"format": "patchsvdd-experiment/1"}', "has the keys"),
    ],
)
def test_manifests_that_are_not_plain_json_are_refused(tmp_path: Path, text: bytes, reason: str) -> None:
    sub = honest()
    refused(Submission(sub.name, {**sub.members, MANIFEST_FILE: text}, sub.weights), tmp_path, reason)


@pytest.mark.parametrize(
    ("export", "reason"),
    [
        ({"name": "x/../../etc", "bank_fraction": 1.0, "max_fpr": None}, "its bundle name 'x/../../etc'"),
        ({"name": "ok", "bank_fraction": 0, "max_fpr": None}, "bank_fraction 0"),
        ({"name": "ok", "bank_fraction": 1.0, "max_fpr": 1.5}, "max_fpr 1.5"),
        ({"name": "ok", "bank_fraction": 1.0, "max_fpr": None, "path": "/"}, "export is"),
    ],
)
def test_export_settings_and_bundle_names_are_checked(tmp_path: Path, export: dict, reason: str) -> None:
    sub = honest("export")
    refused(with_manifest(sub, {**sub.manifest, "export": export}), tmp_path, reason)


def test_defect_types_are_names(tmp_path: Path) -> None:
    sub = honest("evaluation")
    refused(with_manifest(sub, {**sub.manifest, "defect_types": ["good", "../x"]}), tmp_path, "its defect type")
    refused(with_manifest(sub, {**sub.manifest, "defect_types": ["t"] * 65}), tmp_path, "1 to 64 names")


def test_a_model_too_large_to_build_is_refused_before_it_is_allocated(monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = parse_manifest(honest().members[MANIFEST_FILE])
    monkeypatch.setattr(site_model, "MAX_PARAMETERS", 1000)
    with pytest.raises(ExperimentRefused, match="more than a site builds"):
        site_model.site_model(manifest)
    with pytest.raises(ExperimentRefused, match="more than a site builds"):
        site_model.expected_weights(manifest)


def test_the_site_limits_are_far_above_the_papers_settings() -> None:
    assert SITE_LIMITS["batch_size"] >= 64 * 4 and SITE_LIMITS["repeat"] >= 100 * 10


# --- the archive -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("member", "reason"),
    [
        ("model_obj.pkl", "carries a pickle 'model_obj.pkl'"),
        ("tasks_obj.pkl", "carries a pickle"),
        ("evil.py", "carries 'evil.py'"),
        ("save/init.pbuf", "carries 'save/init.pbuf'"),
        ("../x", "carries '../x'"),
        ("/etc/cron.d/x", "carries '/etc/cron.d/x'"),
        ("plan/", "carries 'plan/'"),
    ],
)
def test_archives_carry_only_the_plan_the_manifest_and_requirements(tmp_path: Path, member: str, reason: str) -> None:
    sub = honest()
    refused(Submission(sub.name, {**sub.members, member: b"x"}, sub.weights), tmp_path, reason)


def test_archive_entries_and_sizes_are_bounded(tmp_path: Path) -> None:
    sub = honest()
    many = Submission(sub.name, {**sub.members, **{f"requirements{i}": b"" for i in range(10)}}, sub.weights)
    refused(many, tmp_path, "has 12 entries")
    bomb = Submission(sub.name, {**sub.members, MANIFEST_FILE: b" " * 10_000_000}, sub.weights)
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as out:  # 10 MB of spaces pack to about 10 kB
        for name, data in bomb.members.items():
            out.writestr(name, data)
    assert path.stat().st_size < 100_000
    with pytest.raises(ExperimentRefused, match="unpacks to 10000000 bytes"):
        review_archive(str(path), ENVOY)
    (tmp_path / "junk").write_bytes(b"not a zip")
    with pytest.raises(ExperimentRefused, match="not a zip file"):
        review_archive(str(tmp_path / "junk"), ENVOY)
    without = Submission(sub.name, {PLAN_FILE: sub.members[PLAN_FILE]}, sub.weights)
    refused(without, tmp_path, "has no manifest.json")


def test_requirements_are_refused_unless_the_site_allows_them(tmp_path: Path) -> None:
    sub = honest()
    asking = Submission(sub.name, {**sub.members, "requirements.txt": b"numpy==2.0\nsomething==1.0\n"}, sub.weights)
    refused(asking, tmp_path, "asks to install 2 package")
    allowing = SitePolicy(director_host=HOST, tls=False, install_requirements=True)
    assert review(asking, tmp_path, allowing).packages == ("numpy==2.0", "something==1.0")
    quiet = Submission(sub.name, {**sub.members, "requirements.txt": b"# nothing\n\n"}, sub.weights)
    assert review(quiet, tmp_path).packages == ()


def test_the_plan_and_the_manifest_must_agree_on_the_rounds(tmp_path: Path) -> None:
    sub = honest()
    refused(with_plan(sub, _set(sub.plan, "aggregator.settings.rounds_to_train", 7)), tmp_path, "manifest 3")


def test_a_review_can_only_refuse_whatever_happens_inside(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from patchsvdd.federated.openfl import review as module

    archive = honest().write(tmp_path / "a.zip")
    for error in (SystemExit(3), KeyboardInterrupt(), RecursionError(), MemoryError()):

        def boom(data: bytes, error: BaseException = error) -> None:
            raise error

        monkeypatch.setattr(module, "parse_manifest", boom)
        with pytest.raises(ExperimentRefused, match=f"could not be reviewed \\({type(error).__name__}"):
            review_archive(str(archive), ENVOY)


# --- weights -----------------------------------------------------------------------------------------------------


def test_weights_must_be_the_models_own_float32_arrays(tmp_path: Path) -> None:
    sub = honest()
    expected = site_model.expected_weights(parse_manifest(sub.members[MANIFEST_FILE]))
    site_model.check_weights(expected, sub.weights, "its initial model")
    key = next(iter(expected))
    for arrays, reason in [
        ({**sub.weights, key: np.zeros(3, np.float32)}, "not float32 of shape"),
        ({**sub.weights, key: sub.weights[key].astype(np.float64)}, "float64"),
        ({k: v for k, v in sub.weights.items() if k != key}, "missing"),
        ({**sub.weights, "extra": np.zeros(1, np.float32)}, "extra \\['extra'\\]"),
        ({**sub.weights, key: "an array"}, "str"),
    ]:
        with pytest.raises(ExperimentRefused, match=reason):
            site_model.check_weights(expected, arrays, "its initial model")
    archive = sub.write(tmp_path / "a.zip")
    bigger = {k: np.zeros((2, *v.shape), np.float32) for k, v in sub.weights.items()}
    with pytest.raises(ExperimentRefused, match="its initial model's weights for"):
        site_guard.review_submission(archive, model_proto(bigger), DIRECTOR)


def test_weights_from_the_aggregator_are_checked_in_the_envoy_process(tmp_path: Path) -> None:
    """install_site_guard wraps OpenFL's adapter and restore (run in a child: it patches OpenFL)."""
    import subprocess
    import sys

    code = (
        "import numpy as np, torch\n"
        "from patchsvdd.federated.openfl.site_guard import install_site_guard\n"
        "from patchsvdd.federated.names import ExperimentRefused\n"
        "install_site_guard()\n"
        "from openfl.plugins.frameworks_adapters.pytorch_adapter import FrameworkAdapterPlugin as F\n"
        "from openfl.federated.plan.plan import Plan\n"
        "from patchsvdd.federated.openfl.site_guard import restore_site_object\n"
        "assert Plan.restore_object is restore_site_object\n"
        "m = torch.nn.Linear(2, 2)\n"
        "F.set_tensor_dict(m, {k: v.numpy() for k, v in m.state_dict().items()})\n"
        "try:\n"
        "    F.set_tensor_dict(m, {'weight': np.zeros((3, 3), np.float32), 'bias': np.zeros(2, np.float32)})\n"
        "except ExperimentRefused as e:\n"
        "    print('refused:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "refused: the aggregator's weights for 'weight' are ndarray float32 (3, 3)" in out.stdout, out.stderr


def test_a_site_restores_its_own_objects_from_the_unpacked_manifest(tmp_path: Path) -> None:
    from openfl.federated.plan.plan import Plan

    sub = honest("evaluation")
    (tmp_path / MANIFEST_FILE).write_bytes(sub.members[MANIFEST_FILE])
    previous = Path.cwd()
    os.chdir(tmp_path)
    try:
        plan = Plan()
        tasks = site_guard.restore_site_object(plan, "tasks_obj.pkl")
        assert site_guard.restore_site_object(plan, "tasks_obj.pkl") is tasks  # made once per plan
        assert tasks.task_settings["validate_task"]["defect_types"] == ["good", "crack"]
        (tmp_path / MANIFEST_FILE).write_text(json.dumps({**sub.manifest, "task": "shell"}))
        with pytest.raises(ExperimentRefused, match="task is 'shell'"):
            site_guard.restore_site_object(Plan(), "tasks_obj.pkl")
    finally:
        os.chdir(previous)


# --- configs -----------------------------------------------------------------------------------------------------


def test_configs_cannot_turn_the_guard_off(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[1]
    director = tmp_path / "director.yaml"
    director.write_text((repo / "director_folder" / "director_config.yaml").read_text() + "review_experiments: false\n")
    with pytest.raises(ConfigError, match="the director always reviews experiments"):
        check_director_config(director)
    envoy = tmp_path / "shard.yaml"
    shutil.copy(repo / "envoy_folder" / "shard_config.yaml", envoy)
    envoy.write_text(
        envoy.read_text().replace("../data/demo", str(repo / "data" / "demo")) + "trust_client_code: true\n"
    )
    with pytest.raises(ConfigError, match="a site never runs code a client sends"):
        check_envoy_config(envoy, check_data=False)


def test_a_site_that_requires_secure_aggregation_does_not_start_on_openfl(tmp_path: Path) -> None:
    """OpenFL has no secure aggregation: a site whose config requires it starts only on Flower, and OpenFL's
    side refuses an experiment that asks for it before anything reaches the director."""
    repo = Path(__file__).resolve().parents[1]
    shipped = (repo / "envoy_folder" / "shard_config.yaml").read_text().replace("../data/demo", str(repo / "data"))
    assert "secure_aggregation: optional" in shipped
    envoy = tmp_path / "shard.yaml"
    envoy.write_text(shipped.replace("secure_aggregation: optional", "secure_aggregation: required"))
    with pytest.raises(ConfigError, match="OpenFL 1.7.1 has no secure aggregation: start this site on Flower"):
        check_envoy_config(envoy, check_data=False)
    assert check_envoy_config(envoy, check_data=False, engine="flower")["secure_aggregation"] == "required"
    envoy.write_text(shipped.replace("secure_aggregation: optional", "secure_aggregation: yes"))
    with pytest.raises(ConfigError, match="secure_aggregation True must be optional or required"):
        check_envoy_config(envoy, check_data=False, engine="flower")
    model = build_model("patchsvdd", emb_dim=8)
    manifest = experiment_manifest(model, ExperimentSettings(secure_aggregation=True), "training")
    with pytest.raises(SettingsError, match="OpenFL 1.7.1 has no secure aggregation"):
        OpenFLEngine(federation=None).start(model, manifest, "masked", tmp_path)


def test_the_directors_servers_take_no_message_larger_than_the_largest_model(tmp_path: Path) -> None:
    """OpenFL's servers take messages of 1 GiB; the director's guard lowers that (run in a child: it patches)."""
    import subprocess
    import sys

    code = (
        "from patchsvdd.federated.openfl.site_guard import MAX_MESSAGE_BYTES, install_director_guard\n"
        "install_director_guard()\n"
        "from openfl.transport.grpc.director_server import channel_options\n"
        "print(dict(channel_options)['grpc.max_receive_message_length'] == MAX_MESSAGE_BYTES < 2**30)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.stdout.strip() == "True", out.stderr[-2000:]
