"""The review of an experiment archive: what a site and the director take from a client, which is data only.

An archive this project's client sends holds exactly ``plan/plan.yaml``, ``manifest.json`` and, optionally,
``requirements.txt``. ``review_archive`` accepts it only if

1. **the archive** has at most ``MAX_ENTRIES`` members, each one of those names and within its size (checked
   on the zip's directory before a byte is read, and again while reading);
2. **the plan** is ASCII (OpenFL reads it in the locale's encoding) YAML of at most ``MAX_PLAN_BYTES``,
   nesting ``MAX_PLAN_DEPTH`` deep, with no anchor, alias or tag, and equal, key for key and value for value,
   to the plan this project writes (``canonical_plan``) for its five variable values: the aggregator's
   address and port, TLS, the rounds, the device policy. So every template, every state path of the
   aggregator (``best_state_path`` ...), ``require_client_auth`` and anything else is the project's own;
3. **the manifest** passes ``manifest.parse_manifest`` and asks the rounds the plan has;
4. **requirements**: none, unless the policy allows them (``install_requirements``: pip then installs
   whatever they name, which runs code: docs/security.md).

No pickle is ever read: a site builds what it runs from its own code (``site_build.py``). No torch, no OpenFL.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from typing import Any

import yaml

from patchsvdd.federated.manifest import MANIFEST_FILE, SITE_LIMITS, ExperimentManifest, parse_manifest
from patchsvdd.federated.names import SHOWN, ExperimentRefused, shown
from patchsvdd.settings import DEVICE_POLICIES

PLAN_FILE = "plan/plan.yaml"
REQUIREMENTS_FILE = "requirements.txt"
# member -> the most bytes it may unpack to
ARCHIVE_FILES = {PLAN_FILE: 16 * 1024, MANIFEST_FILE: 64 * 1024, REQUIREMENTS_FILE: 64 * 1024}
MAX_ENTRIES = 8
MAX_PLAN_BYTES = ARCHIVE_FILES[PLAN_FILE]
MAX_PLAN_DEPTH = 8
HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*")
AUTO = "auto"
FRAMEWORK_ADAPTER = "openfl.plugins.frameworks_adapters.pytorch_adapter.FrameworkAdapterPlugin"
SERIALIZER = "openfl.plugins.interface_serializer.cloudpickle_serializer.CloudpickleSerializer"
OPT_TREATMENT = "CONTINUE_LOCAL"  # each envoy keeps its own Adam state across rounds


@dataclass(frozen=True)
class PlanValues:
    """The only values of an experiment's plan that vary: where the aggregator listens, TLS, rounds, devices."""

    agg_addr: str
    agg_port: int | str  # a port, or 'auto': OpenFL's, from a hash of the plan
    use_tls: bool
    rounds_to_train: int
    device_policy: str


def canonical_plan(values: PlanValues) -> dict[str, Any]:
    """OpenFL 1.7.1's plan of this project's experiments for ``values`` (what the client writes and the only plan
    a site accepts). The pickle names in ``api_layer`` are OpenFL's own; no site reads such a file."""
    return {
        "aggregator": {
            "settings": {
                "best_state_path": "save/best.pbuf",
                "db_store_rounds": 2,
                "init_state_path": "save/init.pbuf",
                "last_state_path": "save/last.pbuf",
                "rounds_to_train": values.rounds_to_train,
            },
            "template": "openfl.component.Aggregator",
        },
        "api_layer": {
            "required_plugin_components": {"serializer_plugin": SERIALIZER},
            "settings": {
                "aggregation_function_interface_file": "aggregation_function_obj.pkl",
                "dataloader_interface_file": "loader_obj.pkl",
                "model_interface_file": "model_obj.pkl",
                "task_assigner_file": "task_assigner_obj.pkl",
                "tasks_interface_file": "tasks_obj.pkl",
            },
        },
        "assigner": {
            "settings": {
                "task_groups": [
                    {
                        "name": "learning",
                        "percentage": 1.0,
                        "tasks": ["aggregated_model_validation", "train", "locally_tuned_model_validation"],
                    }
                ]
            },
            "template": "openfl.component.RandomGroupedAssigner",
        },
        "collaborator": {
            "settings": {
                "db_store_rounds": 1,
                "delta_updates": False,
                "device_assignment_policy": values.device_policy,
                "opt_treatment": OPT_TREATMENT,
            },
            "template": "openfl.component.Collaborator",
        },
        "compression_pipeline": {"settings": {}, "template": "openfl.pipelines.NoCompressionPipeline"},
        "data_loader": {"settings": {}, "template": "openfl.federated.DataLoader"},
        "network": {
            "settings": {
                "agg_addr": values.agg_addr,
                "agg_port": values.agg_port,
                "cert_folder": "cert",
                "client_reconnect_interval": 5,
                "hash_salt": AUTO,
                "require_client_auth": True,
                "use_tls": values.use_tls,
            },
            "template": "openfl.federation.Network",
        },
        "task_runner": {
            "required_plugin_components": {"framework_adapters": FRAMEWORK_ADAPTER},
            "settings": {},
            "template": "openfl.federated.task.task_runner.CoreTaskRunner",
        },
        "tasks": {"settings": {}},
    }


@dataclass(frozen=True)
class SitePolicy:
    """What a node accepts. An envoy: its director's host (where its updates may go), whether it speaks TLS, whether
    its config lets experiments install packages. The director (``director_host``/``tls`` None) checks the rest."""

    director_host: str | None
    tls: bool | None
    install_requirements: bool = False


@dataclass(frozen=True)
class Review:
    """An accepted experiment: its manifest, the variable values of its plan, the packages it installs."""

    manifest: ExperimentManifest
    plan: PlanValues
    packages: tuple[str, ...] = ()


class PlanLoader(yaml.SafeLoader):
    """PyYAML's safe loader without anchors, aliases or explicit tags, and with a bounded depth: a plan's
    parse is then linear in its size."""

    depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise ExperimentRefused("its plan uses YAML anchors or aliases, which this project's plan never has")
        if getattr(event, "tag", None) is not None:
            raise ExperimentRefused(f"its plan uses the YAML tag {shown(event.tag)}")
        self.depth += 1
        try:
            if self.depth > MAX_PLAN_DEPTH:
                raise ExperimentRefused(f"its plan nests deeper than {MAX_PLAN_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def parse_plan(data: bytes) -> Any:
    """The YAML in ``data`` (plan.yaml's bytes) under the limits of ``PlanLoader``; ExperimentRefused otherwise."""
    if len(data) > MAX_PLAN_BYTES:
        raise ExperimentRefused(f"its plan has {len(data)} bytes, more than {MAX_PLAN_BYTES}")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as exc:
        raise ExperimentRefused("its plan is not ASCII text (OpenFL reads it in the locale's encoding)") from exc
    try:
        return yaml.load(text, Loader=PlanLoader)  # PlanLoader: a SafeLoader with limits
    except yaml.YAMLError as exc:
        raise ExperimentRefused(f"its plan is not plain YAML ({type(exc).__name__})") from exc


def _at(plan: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(plan, dict) or key not in plan:
            raise ExperimentRefused(f"its plan lacks {'.'.join(path)}")
        plan = plan[key]
    return plan


def first_difference(got: Any, expected: Any, path: str = "") -> str | None:
    """Where ``got`` differs from ``expected`` first (a dotted key and both values), or None where they are equal
    (types too: 1 is not True, nor 1.0)."""
    if isinstance(expected, dict) and isinstance(got, dict):
        for key in sorted(set(got) | set(expected), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in expected:
                return f"sets {shown(where, 2 * SHOWN)}, which this project's plan has not"
            if key not in got:
                return f"lacks {where}"
            found = first_difference(got[key], expected[key], where)
            if found:
                return found
        return None
    if isinstance(expected, list) and isinstance(got, list) and len(got) == len(expected):
        for i, (g, e) in enumerate(zip(got, expected)):
            found = first_difference(g, e, f"{path}[{i}]")
            if found:
                return found
        return None
    if type(got) is not type(expected) or got != expected:
        return f"sets {path} to {shown(got)}, where this project's plan has {shown(expected)}"
    return None


def plan_values(plan: Any, policy: SitePolicy) -> PlanValues:
    """The variable values of ``plan``, each checked (and against ``policy``); then the whole plan must equal
    ``canonical_plan`` of them, else ExperimentRefused naming the first key that differs."""
    if not isinstance(plan, dict):
        raise ExperimentRefused(f"its plan is a {type(plan).__name__}, not a mapping")
    values = PlanValues(
        agg_addr=_at(plan, "network", "settings", "agg_addr"),
        agg_port=_at(plan, "network", "settings", "agg_port"),
        use_tls=_at(plan, "network", "settings", "use_tls"),
        rounds_to_train=_at(plan, "aggregator", "settings", "rounds_to_train"),
        device_policy=_at(plan, "collaborator", "settings", "device_assignment_policy"),
    )
    if not isinstance(values.agg_addr, str) or HOST.fullmatch(values.agg_addr) is None or len(values.agg_addr) > 253:
        raise ExperimentRefused(f"its plan's aggregator address {shown(values.agg_addr)} is not a host name")
    port = values.agg_port
    if port != AUTO and (not isinstance(port, int) or isinstance(port, bool) or not 1024 <= port <= 65535):
        raise ExperimentRefused(f"its plan's aggregator port {shown(port)} is not 'auto' or a port in 1024..65535")
    if not isinstance(values.use_tls, bool):
        raise ExperimentRefused(f"its plan sets use_tls {shown(values.use_tls)}")
    rounds = values.rounds_to_train
    if not isinstance(rounds, int) or isinstance(rounds, bool) or not 1 <= rounds <= SITE_LIMITS["rounds"] + 1:
        raise ExperimentRefused(f"its plan asks {shown(rounds)} rounds (1..{SITE_LIMITS['rounds'] + 1})")
    if values.device_policy not in DEVICE_POLICIES:
        raise ExperimentRefused(f"its plan's device policy {shown(values.device_policy)} is not one OpenFL knows")
    difference = first_difference(plan, canonical_plan(values))
    if difference:
        raise ExperimentRefused(f"its plan {difference}")
    if policy.director_host is not None and values.agg_addr.lower() != policy.director_host.lower():
        raise ExperimentRefused(
            f"its plan sends this site's updates to {shown(values.agg_addr)}, not to this envoy's director "
            f"{policy.director_host!r}"
        )
    if policy.tls is not None and values.use_tls is not policy.tls:
        raise ExperimentRefused(
            f"its plan sets use_tls {values.use_tls} but this envoy {'speaks' if policy.tls else 'does not speak'} TLS"
        )
    return values


def requested_packages(text: str) -> list[str]:
    """The lines of a requirements file that ask pip for something (not blank, not a comment)."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def _read(bundle: zipfile.ZipFile, name: str) -> bytes:
    with bundle.open(name) as member:
        data = member.read(ARCHIVE_FILES[name] + 1)
    if len(data) > ARCHIVE_FILES[name]:
        raise ExperimentRefused(f"its {name} unpacks to more than {ARCHIVE_FILES[name]} bytes")
    return data


def check_members(members: list[zipfile.ZipInfo]) -> None:
    """ExperimentRefused unless the archive holds at most ``MAX_ENTRIES`` members, each a file this project's
    client sends, once, within its size."""
    names = [member.filename for member in members]
    pickles = [name for name in names if name.endswith((".pkl", ".pickle"))]
    if pickles:
        raise ExperimentRefused(
            f"its archive carries a pickle {shown(pickles[0])}, which this project's experiments never send "
            "(a site builds its model and tasks from its own code and the manifest)"
        )
    if len(members) > MAX_ENTRIES:
        raise ExperimentRefused(f"its archive has {len(members)} entries; this project's has at most 3")
    for member in members:
        name = member.filename
        if name not in ARCHIVE_FILES:
            raise ExperimentRefused(f"its archive carries {shown(name)}, which this project's experiments never send")
        if names.count(name) > 1:
            raise ExperimentRefused(f"its archive holds {name} twice")
        if member.file_size > ARCHIVE_FILES[name]:
            raise ExperimentRefused(f"its {name} unpacks to {member.file_size} bytes, more than {ARCHIVE_FILES[name]}")


def review_archive(archive: str, policy: SitePolicy) -> Review:
    """Review an experiment archive (a zip, as the director receives and sends it) against ``policy`` as the
    module's docstring says. ExperimentRefused says what is refused and why; anything else that goes wrong
    while reviewing (a malformed zip, memory, recursion, even SystemExit) becomes one too: a review can only
    accept or refuse."""
    try:
        return _review(archive, policy)
    except ExperimentRefused:
        raise
    except BaseException as exc:  # a review answers with a refusal, whatever happens inside
        raise ExperimentRefused(f"its archive could not be reviewed ({type(exc).__name__}: {shown(str(exc))})") from exc


def _review(archive: str, policy: SitePolicy) -> Review:
    try:
        bundle = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as exc:
        raise ExperimentRefused(f"its archive is not a zip file ({exc})") from exc
    with bundle:
        members = bundle.infolist()
        check_members(members)
        names = {member.filename for member in members}
        for required in (PLAN_FILE, MANIFEST_FILE):
            if required not in names:
                raise ExperimentRefused(f"its archive has no {required}")
        plan = plan_values(parse_plan(_read(bundle, PLAN_FILE)), policy)
        manifest = parse_manifest(_read(bundle, MANIFEST_FILE))
        text = _read(bundle, REQUIREMENTS_FILE).decode("utf-8", "replace") if REQUIREMENTS_FILE in names else ""
    if plan.rounds_to_train != manifest.rounds_to_train:
        raise ExperimentRefused(
            f"its plan asks {plan.rounds_to_train} rounds but its manifest {manifest.rounds_to_train} "
            f"({manifest.training_rounds} of training and one of validation)"
        )
    packages = requested_packages(text)
    if packages and not policy.install_requirements:
        raise ExperimentRefused(
            f"it asks to install {len(packages)} package(s) ({shown(', '.join(packages[:3]))}), which this "
            "site's config does not allow (params.install_requirements: false)"
        )
    return Review(manifest, plan, tuple(packages))
