"""Secure aggregation (``flower.secagg``) without processes: Flower's SecAgg+ workflow and mod, in this
process, between the driver's side and sites whose training step is given; and the checks a site makes of
every SecAgg+ message before Flower's mod reads it."""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.supercore.task_identity import TaskIdentity

from patchsvdd.federated.flower import records, secagg
from patchsvdd.federated.flower.driver import fedavg
from patchsvdd.federated.flower.records import RecordError
from patchsvdd.federated.flower.site import weight_names
from patchsvdd.federated.manifest import experiment_manifest
from patchsvdd.federated.rounds import tagged
from patchsvdd.federated.site_model import expected_weights
from patchsvdd.models.registry import build_model
from patchsvdd.settings import ExperimentSettings

Step = Callable[[RecordDict], RecordDict]


@pytest.fixture(autouse=True)
def _a_run() -> None:
    """Who this process is in a run, as the driver sets it when it takes the run's ServerApp task."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 0


class SitesHere:
    """Sites answering SecAgg+ messages in this process: each keeps its SecAgg+ state in its own Context, as
    a SuperNode keeps a run's context, and trains with ``steps[node]``. ``seen`` holds every reply."""

    def __init__(self, steps: dict[int, Step]) -> None:
        self.steps = steps
        self.contexts = {node: Context(7, node, {}, RecordDict(), {}) for node in steps}
        self.seen: list[RecordDict] = []

    def collect(self, messages: list[Message], timeout: float) -> tuple[list[Message], list[str]]:
        replies, problems = [], []
        for sent in messages:
            message = copy.deepcopy(sent)  # each site gets its own copy, as over the network (Flower's mod edits it)
            node = message.metadata.dst_node_id
            message.metadata.__dict__["_message_id"] = message.object_id  # as pushing it would
            try:
                reply = secagg.masked_train(message, self.contexts[node], self.steps[node], weight_names)
            except RecordError as exc:
                problems.append(f"site {node}: {exc}")
                continue
            self.seen.append(reply.content)
            replies.append(reply)
        return replies, problems


def _experiment(seed: int = 0) -> tuple[ConfigRecord, dict[str, np.ndarray]]:
    model = tagged(build_model("patchsvdd", emb_dim=8))
    manifest = experiment_manifest(model, ExperimentSettings(rounds=1, secure_aggregation=True), "training")
    ordered = {key: model.state_dict()[key].numpy().copy() for key in expected_weights(manifest)}
    return records.task_record(manifest, "masked", 0), ordered


def _trains_to(weights: dict[str, np.ndarray], train_size: int) -> Step:
    """A site's step that 'trains' to ``weights`` (and reports its sizes and a loss)."""

    def step(task: RecordDict) -> RecordDict:
        records.read_task(task)  # what the site's own step reads first
        return RecordDict(
            {
                records.SIZES: records.metrics_record({"train_size": train_size, "test_size": 5}),
                records.TRAIN: records.metrics_record({"loss": 0.5 + train_size}),
                records.ARRAYS: records.weights_record(weights),
            }
        )

    return step


def test_the_secure_mean_is_fedavg_to_its_quantisation_and_no_weight_leaves_in_the_clear() -> None:
    task, start = _experiment()
    rng = np.random.default_rng(0)
    trained = {
        node: {k: (v + rng.normal(0, 0.05, v.shape)).astype(np.float32) for k, v in start.items()} for node in (11, 22)
    }
    sizes = {11: 4, 22: 3}
    sites = SitesHere({node: _trains_to(trained[node], sizes[node]) for node in sizes})
    metrics, mean = secagg.secure_round(sites.collect, 7, task, start, sizes, timeout=30)

    expected = fedavg([trained[11], trained[22]], [4, 3])
    assert list(mean) == list(start)
    # each site's stochastic rounding moves its scaled weights by under one step of 2C/Q; the sum of the
    # scales (4/4 + 3/4) divides the error of the sum; float32 rounds the result
    step = 2 * secagg.CLIPPING_RANGE / secagg.quantization_range(2)
    bound = 2 * step / (1 + 3 / 4)
    for key in expected:
        tolerance = bound + np.abs(expected[key]) * np.finfo(np.float32).eps
        assert np.all(np.abs(mean[key].astype(np.float64) - expected[key]) <= tolerance), key
    assert not all(np.array_equal(mean[k], trained[11][k]) for k in mean)
    assert {node: records.read_metrics(metrics[node], records.TRAIN) for node in sizes} == {
        11: {"loss": 4.5},
        22: {"loss": 3.5},
    }
    assert records.read_sizes(metrics[22]) == (3, 5)
    for reply in sites.seen:  # what reached the driver: no float array anywhere, masked integers only
        assert all(len(record) == 0 for record in reply.array_records.values())
        configs = reply.config_records[RECORD_KEY_CONFIGS]
        if Key.MASKED_PARAMETERS in configs:
            assert all(isinstance(b, bytes) for b in configs[Key.MASKED_PARAMETERS])


def test_a_site_refuses_weights_it_would_have_to_clip() -> None:
    task, start = _experiment()
    far = {k: v.copy() for k, v in start.items()}
    first = next(iter(far))
    far[first][...] = 9.0  # beyond the clipping range 8
    sites = SitesHere({1: _trains_to(far, 4), 2: _trains_to(start, 4)})
    with pytest.raises(RecordError, match=r"site 1: a trained weight reaches 9, beyond SecAgg\+'s clipping range 8"):
        secagg.secure_round(sites.collect, 7, task, start, {1: 4, 2: 4}, timeout=30)


def test_bounds_follow_from_the_modulus() -> None:
    assert secagg.quantization_range(2) == 2**30
    assert secagg.quantization_range(4) == 2**29
    for sites in range(2, secagg.MAX_SITES + 1):
        q = secagg.quantization_range(sites)
        assert sites * q < secagg.MODULUS_RANGE <= 2 * sites * q  # the largest power of two that cannot wrap
        assert secagg.threshold(sites) > sites / 2


def _setup(**changes: object) -> RecordDict:
    configs = {
        Key.STAGE: Stage.SETUP,
        Key.SAMPLE_NUMBER: 2,
        Key.SHARE_NUMBER: 2,
        Key.THRESHOLD: 2,
        Key.CLIPPING_RANGE: 8.0,
        Key.TARGET_RANGE: 2**30,
        Key.MOD_RANGE: 2**32,
        Key.MAX_WEIGHT: 4.0,
    }
    configs.update(changes)  # type: ignore[arg-type]
    return RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({k: v for k, v in configs.items() if v is not None})})


@pytest.mark.parametrize(
    "content, named",
    [
        (_setup(threshold=1), "threshold is 1"),  # one share would rebuild a site's secret
        (_setup(sample_num=3, share_num=3, threshold=1), "threshold is 1"),
        (_setup(sample_num=10**6, share_num=10**6, threshold=10**6), "sample_num"),
        (_setup(mod_range=3 * 2**30), "not a power of two"),
        (_setup(sample_num=4, share_num=4, threshold=3), "above 4 x target_range"),  # the sum could wrap
        (_setup(clipping_range=float("inf")), "clipping_range"),
        (_setup(max_weight=None), "holds the keys"),
        (_setup(extra=1), "holds the keys"),
        (RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.STAGE: "steal"})}), "stage 'steal'"),
        (RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.STAGE: Stage.SETUP}), "x": ConfigRecord()}), "holds"),
    ],
)
def test_a_site_refuses_secagg_settings_this_project_does_not_send(content: RecordDict, named: str) -> None:
    with pytest.raises(RecordError, match=named):
        secagg.check_secagg_message(content, shares=0)


def test_a_site_refuses_more_keys_or_shares_than_setup_agreed() -> None:
    keys = {str(n): [b"k" * 91, b"l" * 91] for n in range(5)}
    share = RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.STAGE: Stage.SHARE_KEYS, **keys})})
    with pytest.raises(RecordError, match="names 5 sites; setup agreed on 2"):
        secagg.check_secagg_message(share, shares=2)
    odd = RecordDict(
        {RECORD_KEY_CONFIGS: ConfigRecord({Key.STAGE: Stage.SHARE_KEYS, "../1": [b"k", b"l"], "2": [b"k", b"l"]})}
    )
    with pytest.raises(RecordError, match="is not a node id"):
        secagg.check_secagg_message(odd, shares=2)
    unmask = ConfigRecord({Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: [1, 2, 3], Key.DEAD_NODE_ID_LIST: []})
    with pytest.raises(RecordError, match="more sites than the 2 shares"):
        secagg.check_secagg_message(RecordDict({RECORD_KEY_CONFIGS: unmask}), shares=2)


def test_masks_come_from_the_whole_seed_on_both_sides() -> None:
    """Flower's own expansion folds a seed into 32 bits: two seeds with the same fold give the same mask. The
    mod and the workflow here use ``mask_stream``, where they differ."""
    import importlib

    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    one, other = bytes(32), b"\x01\x00\x00\x00" * 2 + bytes(24)  # the same 32-bit fold
    shapes = [(3, 4), (), (5,)]
    assert all(
        np.array_equal(a, b) for a, b in zip(pseudo_rand_gen(one, 2**32, shapes), pseudo_rand_gen(other, 2**32, shapes))
    )
    ours = secagg.mask_stream(one, 2**32, shapes)
    assert not all(np.array_equal(a, b) for a, b in zip(ours, secagg.mask_stream(other, 2**32, shapes)))
    assert [m.shape for m in ours] == shapes and all(m.dtype == np.int64 for m in ours)
    assert all(np.array_equal(a, b) for a, b in zip(ours, secagg.mask_stream(one, 2**32, shapes)))  # deterministic
    large = secagg.mask_stream(b"seed" * 8, 2**32, [(200_000,)])[0]
    assert 0 <= large.min() and large.max() < 2**32 and abs(large.mean() / 2**32 - 0.5) < 0.01
    for name in secagg.MASKED_MODULES:
        assert importlib.import_module(name).pseudo_rand_gen is secagg.mask_stream
    with pytest.raises(ValueError, match="not a power of two"):
        secagg.mask_stream(one, 3 * 2**20, shapes)
