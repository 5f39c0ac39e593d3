"""The notebook's side of the director: connect, read the shard registry, submit, take up, fetch.

Every call that sends an experiment writes the project's plan and the experiment's manifest into a working
folder and sends the two as the experiment's archive, with the initial weights as arrays (``ManifestExperiment``):
data only, which is all a site takes. A record of the experiment stays there too, which ``attach`` reads
after a kernel restart.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from openfl.interface.interactive_api.experiment import FLExperiment, ModelInterface
from openfl.interface.interactive_api.federation import Federation
from torch import nn

from patchsvdd.data.mvtec import BUNDLE_FOLDER_LABEL, DEFECT_TYPES_LABEL, GOOD
from patchsvdd.federated.manifest import MANIFEST_FILE, ExperimentManifest, experiment_manifest
from patchsvdd.federated.openfl.review import FRAMEWORK_ADAPTER, PLAN_FILE, PlanValues, canonical_plan
from patchsvdd.federated.rounds import tagged, untagged
from patchsvdd.settings import ExperimentSettings
from patchsvdd.system.tls import TLSCheckError, check_mutual_tls, speaks_tls
from patchsvdd.training.loop import make_optimizer

EXPERIMENT_RECORD = "patchsvdd_experiment.json"  # written in an experiment's working folder; read by attach()


class FederationError(RuntimeError):
    """The federation did not do what was asked (refused, stalled, failed); the message says what and where to look."""


class DirectorFederation(Federation):
    """OpenFL's ``Federation`` that also remembers the director's port (for messages and probes)."""

    def __init__(self, *, director_port: int, **kwargs: Any) -> None:
        super().__init__(director_port=director_port, **kwargs)
        self.director_port = int(director_port)


def connect(
    host: str,
    port: int,
    tls: bool = False,
    cert_chain: str | None = None,
    api_cert: str | None = None,
    api_private_key: str | None = None,
    client_id: str = "frontend",
) -> DirectorFederation:
    """A ``Federation`` handle on the director at ``host:port``; TLS files are needed only with ``tls=True``.

    One handshake first, so that an unreachable director, a TLS mismatch or a
    refused certificate raise FederationError with a plain sentence at once.
    """
    try:
        if tls:
            for name, path in (
                ("cert_chain", cert_chain),
                ("api_cert", api_cert),
                ("api_private_key", api_private_key),
            ):
                if not path or not Path(path).is_file():
                    raise FederationError(f"TLS is on but {name} {path!r} is not a file")
            check_mutual_tls(host, int(port), str(cert_chain), str(api_cert), str(api_private_key))
        elif speaks_tls(host, int(port)):
            raise FederationError(
                f"the director at {host}:{port} requires TLS: set tls=True with cert_chain, "
                "api_cert and api_private_key"
            )
    except TLSCheckError as exc:
        raise FederationError(str(exc)) from exc
    return DirectorFederation(
        client_id=client_id,
        director_node_fqdn=host,
        director_port=int(port),
        tls=tls,
        cert_chain=cert_chain,
        api_cert=api_cert,
        api_private_key=api_private_key,
    )


def _shard_registry(federation: Federation, settle: float = 15.0) -> dict[str, Any]:
    """The director's shard registry. OpenFL 1.7.1's director fails this call with a KeyError while an envoy
    has registered but not yet asked for work (a second or so); such answers are retried for ``settle`` s."""
    import grpc

    deadline = time.monotonic() + settle
    while True:
        try:
            return federation.get_shard_registry()
        except grpc.RpcError as exc:
            if (
                exc.code() != grpc.StatusCode.UNKNOWN
                or "KeyError" not in str(exc.details())
                or time.monotonic() > deadline
            ):
                raise
            time.sleep(0.5)


def shard_table(federation: Federation) -> list[dict[str, Any]]:
    """One row per envoy the director knows: name, online, description, shapes."""
    rows = []
    for name, info in _shard_registry(federation).items():
        shard = info["shard_info"]
        rows.append(
            {
                "envoy": name,
                "online": bool(info["is_online"]),
                "description": shard.shard_description,
                "sample_shape": list(shard.sample_shape),
                "target_shape": list(shard.target_shape),
            }
        )
    return rows


def online_envoys(federation: Federation) -> set[str]:
    """Names of the envoys the director sees online now."""
    return {row["envoy"] for row in shard_table(federation) if row["online"]}


def wait_for_envoys(
    federation: Federation, count: int, timeout: float = 120.0, poll: float = 1.0
) -> list[dict[str, Any]]:
    """Poll the shard registry until ``count`` envoys are online; FederationError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        rows = shard_table(federation)
        if sum(r["online"] for r in rows) >= count:
            return rows
        if time.monotonic() > deadline:
            names = ", ".join(r["envoy"] for r in rows if r["online"]) or "none"
            raise FederationError(
                f"only {names} online after {timeout:.0f} s; expected {count} envoys (see the envoy logs)"
            )
        time.sleep(poll)


def _described(description: str, label: str) -> str | None:
    """The text after ``label`` in a shard description's '; '-separated parts, or None."""
    for part in str(description).split("; "):
        if part.startswith(label):
            return part[len(label) :].strip()
    return None


def shard_defect_types(federation: Federation) -> list[str] | None:
    """The union of the defect types the online envoys' shard descriptions list ('good' first), or None
    when some envoy's description lists none (a shard descriptor other than this project's)."""
    types = {GOOD}
    for row in shard_table(federation):
        if not row["online"]:
            continue
        listed = _described(row["description"], DEFECT_TYPES_LABEL)
        if listed is None:
            return None
        types.update(t.strip() for t in listed.split(",") if t.strip() and t.strip() != "none")
    return [GOOD, *sorted(types - {GOOD})]


def shard_bundle_folders(federation: Federation) -> dict[str, str | None]:
    """{envoy: the bundle folder at its site, as its shard description says (None where it does not)}."""
    return {row["envoy"]: _described(row["description"], BUNDLE_FOLDER_LABEL) for row in shard_table(federation)}


@contextlib.contextmanager
def working_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Run the block inside ``path``: OpenFL writes plan/, save/, *_obj.pkl there and ships that folder."""
    path = Path(path).resolve()
    path.mkdir(parents=True, exist_ok=True)
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield path
    finally:
        os.chdir(previous)


def write_archive(folder: Path, plan: dict[str, Any], manifest: ExperimentManifest, name: str) -> Path:
    """Write ``plan`` (``plan/plan.yaml``) and ``manifest`` (``manifest.json``) into ``folder`` and pack the two
    into ``folder/name``: an experiment's archive, everything a site takes from a client besides weights."""
    (folder / "plan").mkdir(parents=True, exist_ok=True)
    (folder / PLAN_FILE).write_text(yaml.safe_dump(plan))
    (folder / MANIFEST_FILE).write_bytes(manifest.to_json())
    path = folder / name
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for member in (PLAN_FILE, MANIFEST_FILE):
            archive.write(folder / member, member)
    return path.resolve()


class ManifestExperiment(FLExperiment):
    """OpenFL's ``FLExperiment`` whose archive is data only: this project's plan (``review.canonical_plan``) and
    the experiment's manifest (``manifest.json``), with the initial weights as arrays, the way every other
    experiment sends them. Nothing is pickled: each site builds the model, optimizer and tasks from its own
    code (``site_build.py``). The plan and manifest stay in the working folder (``attach`` reads the plan)."""

    def submit(self, model: nn.Module, manifest: ExperimentManifest, aggregator_port: int | None) -> None:
        """Send the experiment to the director; FederationError with the director's reason when it refuses."""
        import grpc

        self.plan.authorized_cols = [
            name for name, info in self.federation.get_shard_registry().items() if info["is_online"]
        ]
        values = PlanValues(
            agg_addr=self.federation.director_node_fqdn.split(":")[0],
            agg_port="auto" if aggregator_port is None else int(aggregator_port),
            use_tls=bool(self.federation.tls),
            rounds_to_train=manifest.rounds_to_train,
            device_policy=manifest.settings.device_policy,
        )
        self.plan.config = canonical_plan(values)
        self.arch_path = str(write_archive(Path.cwd(), self.plan.config, manifest, f"{self.experiment_name}.zip"))
        self.plan.resolve()
        model_interface = ModelInterface(
            model=model, optimizer=make_optimizer(model, manifest.settings.lr), framework_plugin=FRAMEWORK_ADAPTER
        )
        try:
            response = self.federation.dir_client.set_new_experiment(
                name=self.experiment_name,
                col_names=self.plan.authorized_cols,
                arch_path=self.arch_path,
                initial_tensor_dict=self._get_initial_tensor_dict(model_interface),
            )
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.PERMISSION_DENIED:
                raise
            raise FederationError(f"experiment {self.experiment_name!r}: {exc.details()}") from exc
        finally:
            self.remove_workspace_archive()
        self.experiment_submitted = bool(response.accepted)


def submit(
    federation: Federation, name: str, model: nn.Module, manifest: ExperimentManifest, workdir: str | os.PathLike
) -> FLExperiment:
    """Send experiment ``name`` of ``manifest`` starting from ``model`` (a round-tagged copy travels) from the
    working folder ``workdir``; FederationError when the director refuses it."""
    with working_folder(workdir):
        experiment = ManifestExperiment(federation=federation, experiment_name=name)
        # a round-tagged copy that says which round made it (see rounds.py); the caller's model is untouched
        experiment.submit(tagged(model), manifest, manifest.settings.aggregator_port)
    if not experiment.experiment_submitted:
        raise FederationError(f"the director did not accept experiment {name!r} (its log says why)")
    record = {"name": name, "participants": list(experiment.plan.authorized_cols), "rounds": manifest.rounds_to_train}
    (Path(workdir) / EXPERIMENT_RECORD).write_text(json.dumps(record, indent=1))
    return experiment


def start_experiment(
    federation: Federation, model: nn.Module, settings: ExperimentSettings, name: str, workdir: str | os.PathLike
) -> FLExperiment:
    """Send a training experiment to the director: ``settings.rounds`` rounds of train + validate, then
    a validation-only round for the final aggregate (reported as round ``settings.rounds``)."""
    return submit(federation, name, model, experiment_manifest(model, settings, "training"), workdir)


def experiment_status(federation: Federation, name: str) -> str | None:
    """The director's status of experiment ``name`` of this client: pending, in_progress, finished, failed,
    rejected; None when the director has no such experiment for this client."""
    status = federation.dir_client.get_experiment_status(name).experiment_status
    return status or None


def attach(federation: Federation, name: str, model: nn.Module, workdir: str | os.PathLike) -> FLExperiment:
    """Take up experiment ``name`` again after the notebook lost its connection (kernel restart, network).

    ``workdir`` is the folder the experiment was started from; ``model`` any
    model of the same kind and shape (its weights are replaced when models are
    fetched). The director keeps the metrics nobody has read yet: the next
    ``follow_metrics`` streams them, then the rest of the experiment. Connect
    with the same client id (or certificate) as the one that started it.
    """
    record_file = Path(workdir) / EXPERIMENT_RECORD
    if not record_file.is_file():
        raise FederationError(
            f"{record_file} not found: attach from the working folder experiment {name!r} was started in"
        )
    record = json.loads(record_file.read_text())
    if record["name"] != name:
        raise FederationError(f"{record_file} records experiment {record['name']!r}, not {name!r}")
    status = experiment_status(federation, name)
    if status is None:
        raise FederationError(
            f"the director has no experiment {name!r} of this client: it was restarted since "
            "(experiments do not survive a director restart) or another client id started it"
        )
    from openfl.federated.plan.plan import Plan

    model = tagged(model)
    model_interface = ModelInterface(model=model, optimizer=make_optimizer(model), framework_plugin=FRAMEWORK_ADAPTER)
    with working_folder(workdir) as folder:
        experiment = FLExperiment(federation=federation, experiment_name=name)
        experiment.plan = Plan.parse(folder / "plan" / "plan.yaml", resolve=False)
        experiment.plan.authorized_cols = list(record["participants"])
        experiment.restore_experiment_state(model_interface)
    return experiment


def fetch_last_model(experiment: FLExperiment) -> nn.Module:
    """The final aggregated model from the director, on the CPU, without the round tag. (OpenFL's own "best"
    model is not used: it keeps the highest of all validation metrics at once; ``SaveWhenImproved`` chooses.)"""
    return untagged(experiment.get_last_model())
