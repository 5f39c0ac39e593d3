"""Honest experiment archives of this project and hypothesis strategies that mutate them, for the review's
tests (tests/test_review.py, tests/test_review_fuzz.py) and its fuzz benchmark (benchmarks/bench_review_fuzz.py).

Each honest archive is written by the client's own code (``client.write_archive`` of ``review.canonical_plan``
and ``client.experiment_manifest``); ``mutations`` changes one or a few things of one at random: zip members
(dropped, doubled, renamed, replaced by random bytes, added), plan keys and values, manifest keys and values,
the weight arrays, and the experiment's name.
"""

from __future__ import annotations

import copy
import json
import re
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from hypothesis import strategies as st

from patchsvdd.federated.manifest import MANIFEST_FILE, Export
from patchsvdd.federated.openfl import client
from patchsvdd.federated.openfl.review import PLAN_FILE, REQUIREMENTS_FILE, PlanValues, canonical_plan
from patchsvdd.federated.rounds import tagged
from patchsvdd.models.registry import build_model
from patchsvdd.settings import ExperimentSettings

HOST = "localhost"


@dataclass
class Submission:
    """What a client submits: the experiment's name, the archive's members and the initial weights."""

    name: str
    members: dict[str, bytes]
    weights: dict[str, Any]
    plan: dict[str, Any] = field(default_factory=dict)  # parsed, for mutation
    manifest: dict[str, Any] = field(default_factory=dict)

    def write(self, path: Path) -> Path:
        with zipfile.ZipFile(path, "w") as archive:
            for member, data in self.members.items():
                archive.writestr(member, data)
        return path


SMALL = {"patchsvdd": {"emb_dim": 8}, "autoencoder": {"latent_dim": 16, "width": 8}}  # each model's own options


def honest(task: str = "training", model: str = "patchsvdd") -> Submission:
    """This project's own submission of ``task`` for a small ``model``, packed by the client's code."""
    settings = ExperimentSettings(model=model, model_options=SMALL[model], rounds=2)
    network = build_model(model, **settings.model_options)
    manifest = client.experiment_manifest(
        network,
        settings,
        task,
        defect_types=["good", "crack"] if task == "evaluation" else None,
        export=Export("run-1-bundle", 0.5, None) if task == "export" else None,
    )
    plan = canonical_plan(PlanValues(HOST, 50051, False, manifest.rounds_to_train, settings.device_policy))
    with tempfile.TemporaryDirectory() as tmp:
        archive = client.write_archive(Path(tmp), plan, manifest, "x.zip")
        with zipfile.ZipFile(archive) as packed:
            members = {name: packed.read(name) for name in packed.namelist()}
    weights = {key: value.numpy().copy() for key, value in tagged(network).state_dict().items()}
    return Submission("run-1", members, weights, plan, json.loads(manifest.to_json()))


# --- values a hostile client may put anywhere ----------------------------------------------------------------

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(["/etc/passwd", "../../x", "subprocess.Popen", "save/best.pbuf", "auto", "localhost", "x" * 300]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)),
    max_leaves=12,
)
NAMES = st.one_of(
    st.text(max_size=120),
    st.sampled_from(["x/../../canary", "/etc", "..", ".", "a\x00b", "a\nb", "cert", "x" * 101, "run-2", "ÿ"]),
)


# names a zip can hold (zipfile cuts a name at a NUL and drops leading slashes; an empty one cannot be written)
MEMBER_NAMES = st.text(min_size=1, max_size=20).filter(lambda name: zipfile.ZipInfo(name).filename != "")


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path inside a nested mapping/list."""
    found = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _paths(value, (*prefix, i))
    return found


@st.composite
def mutated_tree(draw: st.DrawFn, tree: dict[str, Any]) -> dict[str, Any]:
    """``tree`` with one to three keys changed, deleted or added somewhere."""
    tree = copy.deepcopy(tree)
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(tree)
        path = draw(st.sampled_from(paths))
        parent: Any = tree
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace" or not isinstance(parent, dict):
            parent[path[-1]] = draw(VALUES)
        elif action == "delete":
            del parent[path[-1]]
        else:
            parent[draw(st.text(max_size=12))] = draw(VALUES)
    return tree


@st.composite
def mutations(draw: st.DrawFn, base: Submission) -> Submission:
    """One hostile submission derived from ``base`` (see the module's docstring)."""
    sub = Submission(base.name, dict(base.members), dict(base.weights))
    kind = draw(st.sampled_from(["plan", "plan_text", "manifest", "manifest_text", "members", "weights", "name"]))
    if kind == "plan":
        sub.members[PLAN_FILE] = yaml.safe_dump(draw(mutated_tree(base.plan))).encode()
    elif kind == "plan_text":
        text = bytearray(base.members[PLAN_FILE])
        for _ in range(draw(st.integers(1, 4))):
            text[draw(st.integers(0, len(text) - 1))] = draw(st.integers(0, 255))
        sub.members[PLAN_FILE] = bytes(text) + draw(st.sampled_from([b"", b"\na: &x [1]\nb: *x\n", b"\n!!python/x: 1"]))
    elif kind == "manifest":
        sub.members[MANIFEST_FILE] = json.dumps(draw(mutated_tree(base.manifest))).encode()
    elif kind == "manifest_text":
        text = bytearray(base.members[MANIFEST_FILE])
        position = draw(st.integers(0, len(text) - 1))
        text[position : position + draw(st.integers(0, 8))] = draw(st.binary(max_size=8))
        sub.members[MANIFEST_FILE] = bytes(text)
    elif kind == "members":
        action = draw(st.sampled_from(["drop", "add", "bytes", "rename", "many"]))
        member = draw(st.sampled_from(sorted(sub.members)))
        if action == "drop":
            del sub.members[member]
        elif action == "add":
            extra = draw(st.sampled_from([REQUIREMENTS_FILE, "model_obj.pkl", "x.py", "save/a.pbuf", "../x", "/abs"]))
            sub.members[extra] = draw(st.binary(max_size=64))
        elif action == "bytes":
            sub.members[member] = draw(st.binary(max_size=256))
        elif action == "rename":
            sub.members[draw(MEMBER_NAMES)] = sub.members.pop(member)
        else:
            sub.members.update({f"f{i}": b"" for i in range(draw(st.integers(6, 40)))})
    elif kind == "weights":
        key = draw(st.sampled_from(sorted(sub.weights)))
        action = draw(st.sampled_from(["drop", "shape", "dtype", "add"]))
        if action == "drop":
            del sub.weights[key]
        elif action == "shape":
            sub.weights[key] = np.zeros(draw(st.lists(st.integers(0, 5), max_size=3)), np.float32)
        elif action == "dtype":
            sub.weights[key] = sub.weights[key].astype(draw(st.sampled_from([np.float64, np.int32, np.float16])))
        else:
            sub.weights[draw(st.text(min_size=1, max_size=20))] = np.zeros(3, np.float32)
    else:
        sub.name = draw(NAMES)
    return sub


def model_proto(weights: dict[str, Any]) -> Any:
    """The initial weights as OpenFL's client sends them (a ModelProto of float32 bytes and shapes)."""
    from openfl.pipelines import NoCompressionPipeline
    from openfl.protocols.utils import construct_model_proto

    return construct_model_proto(weights, 0, NoCompressionPipeline())


# --- the campaign -------------------------------------------------------------------------------------------------

TASKS = ("training", "evaluation", "export")
BOUND_SECONDS = 10.0  # the most one review of one input may take (a few milliseconds is usual)


class ReviewMisbehaved(AssertionError):
    """A review that neither accepted nor refused in time, or touched a file: the campaign's failure."""


def review_everywhere(sub: Submission, folder: Path) -> list[str]:
    """Feed ``sub`` to the envoy's review and to the director's (the submission's names, the archive, the
    initial weights); each must end in acceptance (then the site builds what it accepted) or one refusal
    sentence, within ``BOUND_SECONDS``, with no file touched. Returns each node's outcome: 'accepted' or the
    refusal's sentence."""
    from patchsvdd.federated.names import ExperimentRefused
    from patchsvdd.federated.openfl import site_build, site_guard
    from patchsvdd.federated.openfl.review import SitePolicy

    archive = sub.write(folder / "archive.zip")
    before = sorted(folder.rglob("*")), sorted(Path.cwd().iterdir())

    def at_the_envoy() -> Any:
        return site_guard.reviewed(sub.name, archive, SitePolicy(director_host=HOST, tls=False))

    def at_the_director() -> Any:
        site_guard.check_submission(sub.name, ["site_a", "site_b"], {})
        return site_guard.review_submission(archive, model_proto(sub.weights), SitePolicy(None, None))[0]

    outcomes = []
    for node, review in (("envoy", at_the_envoy), ("director", at_the_director)):
        started = time.monotonic()
        try:
            accepted = review()
            site_build.SiteObjects.build(accepted.manifest).by_file("model_obj.pkl")
            outcomes.append("accepted")
        except ExperimentRefused as refusal:
            outcomes.append(str(refusal))
        if time.monotonic() - started > BOUND_SECONDS:
            raise ReviewMisbehaved(f"the {node}'s review took {time.monotonic() - started:.1f} s")
    if (sorted(folder.rglob("*")), sorted(Path.cwd().iterdir())) != before:
        raise ReviewMisbehaved("a review touched a file")
    return outcomes


def reason_of(sentence: str) -> str:
    """What kind of refusal a sentence is: its words up to the first value it quotes (at most 7), digits as N."""
    words = []
    for word in sentence.split()[:7]:
        if word[0] in "'\"[{(<" or word[0].isdigit():
            break
        words.append(re.sub(r"\d+", "N", word))
    return " ".join(words)
