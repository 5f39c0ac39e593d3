"""The project's patches of OpenFL 1.7.1 at a site (envoy) and at the director: take only data from a client.

OpenFL's envoy and director would unpack whatever archive a client sends into a folder named after the
client's experiment name (``rmtree``-ing it first), build whatever classes its plan names and unpickle the
model, tasks, data interface, assigner and aggregation functions it carries: code of the client's choice. Here:

- **names first**: the experiment's name (and the collaborators' names) pass ``names.check_name`` before
  anything touches the file system, at the director when it is submitted and at an envoy when it is handed
  out; an experiment unpacks only in ``experiments/`` of the node's working folder (``SiteWorkspace``), never
  on ``sys.path``;
- **review**: the archive, its plan and its manifest pass ``review.review_archive`` (data only: no pickle is
  ever read; any exception of the review, ``SystemExit`` included, is a refusal); the director checks the
  initial weights too, caps what it stores of a submission (``MAX_ARCHIVE_BYTES``) and the size of any
  message its servers take (``MAX_MESSAGE_BYTES``, OpenFL's is 1 GiB);
- **the site's own objects**: ``Plan.restore_object`` gives what ``site_build.SiteObjects`` makes from the
  manifest, in both processes; ``FrameworkAdapterPlugin.set_tensor_dict`` first checks every round's weights
  (``site_model.check_weights``).

A refused experiment is answered at once: the director answers the submission with PERMISSION_DENIED and
the reason; an envoy tells the director the experiment failed, with the reason, says it in one line
``[site guard] <site> refused experiment '<name>': <why>`` and waits for the next. Installed by
``python -m patchsvdd.federated.openfl.fx envoy|director start`` (what the start scripts run).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

from patchsvdd.federated.manifest import MANIFEST_FILE, parse_manifest
from patchsvdd.federated.names import ExperimentRefused, check_name, child, shown
from patchsvdd.federated.openfl.review import ARCHIVE_FILES, Review, SitePolicy, review_archive
from patchsvdd.federated.openfl.site_build import SiteObjects
from patchsvdd.federated.site_model import MAX_PARAMETERS, check_weights, expected_weights

logger = logging.getLogger(__name__)

EXPERIMENTS_FOLDER = "experiments"  # in a node's working folder: where experiments unpack, nothing else
MAX_ARCHIVE_BYTES = sum(ARCHIVE_FILES.values()) + 64 * 1024  # the members and the zip's own records
MAX_COLLABORATORS = 256
MAX_MESSAGE_BYTES = 4 * MAX_PARAMETERS + 64 * 2**20  # the largest model's float32 weights and room besides
REFUSED_BACKOFF_SECONDS = 5  # an envoy that is handed an experiment it refused waits this long before asking again


def say(line: str) -> None:
    """One line in the node's log (standard error, unwrapped)."""
    print(f"[site guard] {line}", file=sys.stderr, flush=True)


def site_workspace(root: Path) -> type:
    """OpenFL's ``ExperimentWorkspace`` unpacking each experiment in ``root/<checked name>`` (never elsewhere, never
    on ``sys.path``), with a ``save/`` folder for the aggregator's states, and OpenFL's own signature so that
    OpenFL's director can make it too."""
    from openfl.utilities.workspace import ExperimentWorkspace

    class SiteWorkspace(ExperimentWorkspace):
        def __init__(self, experiment_name: str, data_file_path: Path, install_requirements: bool = False, **kwargs):
            super().__init__(experiment_name, data_file_path, install_requirements, kwargs.get("remove_archive", True))
            root.mkdir(parents=True, exist_ok=True)
            self.experiment_work_dir = child(root, experiment_name, "its experiment name")

        def __enter__(self) -> None:
            super().__enter__()
            Path("save").mkdir(exist_ok=True)  # where the aggregator keeps its states (the plan's fixed paths)
            while str(self.experiment_work_dir) in sys.path:
                sys.path.remove(str(self.experiment_work_dir))

    return SiteWorkspace


def restore_site_object(plan: Any, filename: str) -> Any:
    """``Plan.restore_object`` of a node: the object this project makes for ``filename`` from the experiment's
    manifest (read, checked, from the unpacked workspace, the current folder), made once per plan."""
    objects = getattr(plan, "_patchsvdd_objects", None)
    if objects is None:
        objects = SiteObjects.build(parse_manifest(Path(MANIFEST_FILE).read_bytes()))
        plan._patchsvdd_objects = objects
    return objects.by_file(str(filename))


def install_site_build() -> None:
    """Patch OpenFL's ``Plan.restore_object`` (this process) to ``restore_site_object``: no pickle is read."""
    from openfl.federated.plan.plan import Plan

    Plan.restore_object = restore_site_object


def reviewed(experiment: str, archive: Path, policy: SitePolicy) -> Review:
    """``review_archive`` of an experiment called ``experiment``, its name checked first."""
    check_name(experiment, "its experiment name")
    return review_archive(str(archive), policy)


def make_guarded_envoy(install_requirements: bool) -> type:
    """OpenFL's Envoy that reviews each experiment before it unpacks it (see the module's docstring)."""
    from openfl.component.envoy.envoy import DEFAULT_RETRY_TIMEOUT_IN_SECONDS, Envoy

    class GuardedEnvoy(Envoy):
        """An envoy that runs only experiments its ``SitePolicy`` accepts, built from its own code."""

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.policy = SitePolicy(
                director_host=str(kwargs["director_host"]),
                tls=bool(kwargs.get("tls", True)),
                install_requirements=install_requirements,
            )
            self.workspace = site_workspace(
                Path.cwd() / EXPERIMENTS_FOLDER / check_name(self.name, "this envoy's name")
            )
            self.refused: set[str] = set()

        def refuse(self, experiment: str, reason: str) -> None:
            line = f"{self.name} refused experiment {shown(experiment)}: {reason}"
            self.refused.add(experiment)
            say(line)
            self.tell_failed(experiment, line)

        def tell_failed(self, experiment: str, line: str) -> None:
            try:
                self.director_client.set_experiment_failed(experiment, error_code=2, error_description=line)
            except Exception as exc:  # the director gone: nothing ran here, and the next wait retries
                logger.warning("could not tell the director that %s was refused: %s", shown(experiment), exc)

        def save_archive(self, data_stream: Any) -> Path:
            """The archive the director streams, in a file of this envoy's naming, refused past
            ``MAX_ARCHIVE_BYTES``."""
            path = Path(str(uuid.uuid4())).absolute()
            size = 0
            with open(path, "wb") as out:
                for response in data_stream:
                    size += len(response.npbytes)
                    if response.size != len(response.npbytes) or size > MAX_ARCHIVE_BYTES:
                        out.close()
                        path.unlink(missing_ok=True)
                        raise ExperimentRefused(f"its archive is broken or larger than {MAX_ARCHIVE_BYTES} bytes")
                    out.write(response.npbytes)
            return path

        def fetch(self, experiment: str) -> Path | None:
            """The experiment's archive, or None when it is refused (name or size) or cannot be had now."""
            try:
                check_name(experiment, "its experiment name")
                return self.save_archive(self.director_client.get_experiment_data(experiment))
            except ExperimentRefused as refusal:
                self.refuse(experiment, str(refusal))
            except Exception as exc:  # the director gone or the archive dropped meanwhile: asked again later
                logger.exception("Failed to get experiment: %s", exc)
                time.sleep(DEFAULT_RETRY_TIMEOUT_IN_SECONDS)
            return None

        def run(self) -> None:
            """OpenFL's ``Envoy.run`` (1.7.1) with the name checked, the archive bounded and reviewed before it
            is unpacked, and the collaborator built from this site's code."""
            while True:
                try:
                    experiment = self.director_client.wait_experiment()
                except Exception as exc:
                    logger.exception("Failed to get experiment: %s", exc)
                    time.sleep(DEFAULT_RETRY_TIMEOUT_IN_SECONDS)
                    continue
                if experiment in self.refused:  # handed out again: not fetched, not logged, the director told again
                    self.tell_failed(experiment, f"{self.name} refused experiment {shown(experiment)} before")
                    time.sleep(REFUSED_BACKOFF_SECONDS)
                    continue
                archive = self.fetch(experiment)
                if archive is None:
                    continue
                try:
                    review = reviewed(experiment, archive, self.policy)
                except ExperimentRefused as refusal:
                    archive.unlink(missing_ok=True)
                    self.refuse(experiment, str(refusal))
                    continue
                if review.packages:
                    say(
                        f"{self.name}: experiment {experiment!r} installs {len(review.packages)} package(s), as "
                        "this site's config allows (params.install_requirements: true)"
                    )
                self.run_reviewed(experiment, archive, bool(review.packages))

        def run_reviewed(self, experiment: str, archive: Path, install: bool) -> None:
            try:
                with self.workspace(experiment, archive, install_requirements=install):
                    self.is_experiment_running = True
                    self._run_collaborator()
            except ExperimentRefused as refusal:  # e.g. weights of another shape from the aggregator
                self.refuse(experiment, str(refusal))
            except Exception as exc:
                logger.exception("Collaborator failed with error: %s:", exc)
                self.director_client.set_experiment_failed(
                    experiment, error_code=1, error_description=traceback.format_exc()
                )
            finally:
                self.is_experiment_running = False

    return GuardedEnvoy


def install_site_guard(install_requirements: bool = False) -> None:
    """Patch OpenFL 1.7.1 in this (envoy) process as the module's docstring says; ``install_requirements``: the
    site's config explicitly lets experiments install packages (pip runs whatever they name)."""
    from openfl.component.envoy import envoy as envoy_module
    from openfl.plugins.frameworks_adapters.pytorch_adapter import FrameworkAdapterPlugin

    envoy_module.Envoy = make_guarded_envoy(install_requirements)  # OpenFL's CLI imports it from there
    install_site_build()
    set_tensor_dict = FrameworkAdapterPlugin.set_tensor_dict

    def checked_set_tensor_dict(model, tensor_dict, optimizer=None, device="cpu"):
        expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
        check_weights(expected, {key: tensor_dict.get(key) for key in expected}, "the aggregator")
        return set_tensor_dict(model, tensor_dict, optimizer, device)

    FrameworkAdapterPlugin.set_tensor_dict = staticmethod(checked_set_tensor_dict)


def review_submission(archive: Path, model_proto: Any, policy: SitePolicy) -> tuple[Review, dict]:
    """The director's review of a submitted experiment: the archive (``review_archive``) and its initial weights,
    which must be the manifest's model's. Any exception inside is a refusal."""
    from openfl.pipelines import NoCompressionPipeline
    from openfl.protocols.utils import deconstruct_model_proto

    review = review_archive(str(archive), policy)
    try:
        if not model_proto.tensors:
            raise ExperimentRefused("it sends no initial model")
        tensor_dict, _ = deconstruct_model_proto(model_proto, NoCompressionPipeline())
        check_weights(expected_weights(review.manifest), tensor_dict, "its initial model")
    except ExperimentRefused:
        raise
    except BaseException as exc:  # a malformed model: a refusal, whatever it raises
        raise ExperimentRefused(f"its initial model cannot be read ({type(exc).__name__})") from exc
    return review, tensor_dict


def check_submission(name: str, collaborators: list[str], registry: Any) -> None:
    """ExperimentRefused unless ``name`` is a plain name no experiment of ``registry`` has, and ``collaborators``
    1 to ``MAX_COLLABORATORS`` plain names: what the director checks before it stores a byte of a submission."""
    check_name(name, "its experiment name")
    if name in registry:
        raise ExperimentRefused(f"an experiment named {name!r} exists already")
    if not 0 < len(collaborators) <= MAX_COLLABORATORS:
        raise ExperimentRefused(f"it names {len(collaborators)} collaborators")
    for collaborator in collaborators:
        check_name(collaborator, "its collaborator")


def cap_received_messages(limit: int = MAX_MESSAGE_BYTES) -> None:
    """Let this process's gRPC servers (the director's, the aggregator's) take messages of at most ``limit``
    bytes instead of OpenFL's 1 GiB: room for the largest model a site builds, not for a flood."""
    from openfl.transport.grpc import grpc_channel_options

    options = grpc_channel_options.channel_options  # one list, shared by reference with every server module
    options[:] = [(key, limit if key == "grpc.max_receive_message_length" else value) for key, value in options]


def install_director_guard(install_requirements: bool = False) -> None:
    """Patch OpenFL 1.7.1's director (this process): each submission is checked as it streams in and reviewed
    before it is registered (``DirectorGRPCServer.SetNewExperiment``), experiments unpack in ``experiments/``
    of the director's working folder, and the assigner and aggregation functions are this project's
    (``install_site_build``). The envoys review again themselves: a site trusts no director for this."""
    import grpc
    from openfl.component.director import experiment as experiment_module
    from openfl.protocols import director_pb2
    from openfl.transport.grpc.director_server import DirectorGRPCServer

    policy = SitePolicy(director_host=None, tls=None, install_requirements=install_requirements)
    experiment_module.ExperimentWorkspace = site_workspace(Path.cwd() / EXPERIMENTS_FOLDER)
    install_site_build()
    cap_received_messages()

    async def receive(server: Any, stream: Any, path: Path) -> Any:
        """The first request of a submission, its archive written to ``path``; names and size checked on the way."""
        first, size = None, 0
        with open(path, "wb") as out:
            async for request in stream:
                if first is None:
                    first = request
                    check_submission(
                        request.name, list(request.collaborator_names), server.director.experiments_registry
                    )
                elif request.name != first.name:
                    raise ExperimentRefused("its archive's parts name different experiments")
                data = request.experiment_data
                size += len(data.npbytes)
                if data.size != len(data.npbytes) or size > MAX_ARCHIVE_BYTES:
                    raise ExperimentRefused(f"its archive is broken or larger than {MAX_ARCHIVE_BYTES} bytes")
                out.write(data.npbytes)
        if first is None:
            raise ExperimentRefused("its submission is empty")
        return first

    async def set_new_experiment(self: Any, stream: Any, context: Any) -> Any:
        caller = self.get_caller(context)
        path = self.root_dir / str(uuid.uuid4())
        name = "?"
        try:
            first = await receive(self, stream, path)
            name = first.name
            loop = asyncio.get_running_loop()
            review, tensor_dict = await loop.run_in_executor(None, review_submission, path, first.model_proto, policy)
        except ExperimentRefused as refusal:
            path.unlink(missing_ok=True)
            say(f"the director refused experiment {shown(name)} from {caller}: {refusal}")
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"the director refused the experiment: {refusal}")
        except BaseException:  # the stream broke off: nothing of it is kept
            path.unlink(missing_ok=True)
            raise
        accepted = await self.director.set_new_experiment(
            experiment_name=name,
            sender_name=caller,
            tensor_dict=tensor_dict,
            collaborator_names=list(first.collaborator_names),
            experiment_archive_path=path,
        )
        logger.info("Experiment %s registered (%s)", name, review.manifest.task)
        return director_pb2.SetNewExperimentResponse(accepted=accepted)

    DirectorGRPCServer.SetNewExperiment = set_new_experiment
