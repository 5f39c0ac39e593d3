"""Secure aggregation of a training round with Flower's SecAgg+: the driver learns only the sites' weighted mean.

With ``secure_aggregation`` set, a training round is Flower's four SecAgg+ stages instead of one ``train``
message: setup (each site's public keys), share keys (Shamir shares of each site's secrets, encrypted to the
other sites), collect masked vectors (each site trains, scales its weights by its training image count,
quantises them and adds a private mask and pairwise masks that cancel in the sum) and unmask (each site
hands the shares that remove the masks of the sum). The driver runs Flower's ``SecAggPlusWorkflow`` over
the engine's grid; a site runs Flower's ``secaggplus_mod`` with the site's own training task as its step.

Bounds (how they were chosen: docs/security.md, "Secure aggregation"):

- ``CLIPPING_RANGE``: the quantiser's range [-8, 8] for each scaled weight. A site refuses to send weights
  beyond it (they would be clipped, and the mean silently wrong) and says so.
- ``quantization_range(sites)``: the largest power of two, at most 2**30 (Flower quantises into int32),
  with ``sites`` times it below the modulus 2**32, so that the masked sum cannot wrap.
- ``max_weight``: the largest site's training image count, so that no site's scale exceeds 1.

Masks from the whole seed: Flower 1.42 expands each 32-byte mask seed with ``numpy.random.RandomState`` after
folding it into 32 bits (``secaggplus_utils.pseudo_rand_gen``), so each mask is one of 2**32 streams, which a
curious driver could search. Both sides here expand the whole seed instead (``mask_stream``: ChaCha20's
keystream under the seed's SHA-256), put in the place of Flower's function in its mod and workflow
(``use_full_seed_masks``, done on import; a test fails if a Flower release moves it).

Each site checks every SecAgg+ message against what this project's driver sends (``check_secagg_message``)
before Flower's mod reads it: at most ``MAX_SITES`` sites, a reconstruction threshold above half the
shares (no set of sites can give the driver both a site's mask seed and its key), ranges that cannot wrap,
and sizes. The training step inside reads the task as ``records`` reads any task (manifest, name, weights).
"""

from __future__ import annotations

import hashlib
import importlib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from patchsvdd.federated.flower import records
from patchsvdd.federated.flower.records import RecordError

CLIPPING_RANGE = 8.0  # 7x the largest weight measured (1.15, a fresh Kaiming-initialised Patch SVDD)
MODULUS_RANGE = 2**32  # Flower's largest modulus
MAX_QUANTIZATION_RANGE = 2**30  # Flower rounds quantised values into int32
MAX_SITES = 64  # sites of one SecAgg+ round a site takes part in (each costs it a key agreement)
MAX_KEY_BYTES = 512  # a public key (Flower's: 91 bytes, DER of an elliptic-curve key)
MAX_CIPHERTEXT_BYTES = 4096  # an encrypted pair of shares (Flower's: under 300 bytes)
SETUP_KEYS = {
    Key.STAGE,
    Key.SAMPLE_NUMBER,
    Key.SHARE_NUMBER,
    Key.THRESHOLD,
    Key.CLIPPING_RANGE,
    Key.TARGET_RANGE,
    Key.MOD_RANGE,
    Key.MAX_WEIGHT,
}
FITINS_CONFIG, FITINS_PARAMETERS = "fitins.config", "fitins.parameters"


def mask_stream(seed: bytes, num_range: int, dimensions_list: list[tuple[int, ...]]) -> list[np.ndarray]:
    """Uniform masks in [0, ``num_range``) of the given shapes (int64), from the whole ``seed``: ChaCha20's
    keystream under SHA-256(seed), 4 bytes an entry (``num_range``: a power of two up to 2**32)."""
    if num_range & (num_range - 1) or not 2 <= num_range <= MODULUS_RANGE:
        raise ValueError(f"mask range {num_range} is not a power of two from 2 to 2**32")
    sizes = [math.prod(shape) for shape in dimensions_list]
    key = hashlib.sha256(seed).digest()
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(4 * sum(sizes)))
    words = np.frombuffer(stream, dtype="<u4").astype(np.int64) & (num_range - 1)
    ends = np.cumsum(sizes)
    return [words[end - size : end].reshape(shape) for size, end, shape in zip(sizes, ends, dimensions_list)]


MASKED_MODULES = (
    "flwr.client.mod.secure_aggregation.secaggplus_mod",
    "flwr.server.workflow.secure_aggregation.secaggplus_workflow",
)


def use_full_seed_masks() -> None:
    """Put ``mask_stream`` in the place of Flower's ``pseudo_rand_gen`` in its SecAgg+ mod and workflow."""
    for name in MASKED_MODULES:
        module = importlib.import_module(name)
        if not callable(getattr(module, "pseudo_rand_gen", None)):
            raise RuntimeError(f"{name} has no pseudo_rand_gen any more: see patchsvdd.federated.flower.secagg")
        module.pseudo_rand_gen = mask_stream  # type: ignore[attr-defined]


use_full_seed_masks()


def quantization_range(sites: int) -> int:
    """The largest power of two Q <= 2**30 with ``sites`` * Q below the modulus (the sum of the sites'
    quantised values, each at most Q, must not wrap)."""
    q = MAX_QUANTIZATION_RANGE
    while sites * q >= MODULUS_RANGE:
        q //= 2
    return q


def threshold(sites: int) -> int:
    """Shares that rebuild a site's secret: more than half, so that the sites that answer the driver cannot
    hand it both a site's mask seed and its key (each answers once per round with one or the other)."""
    return sites // 2 + 1


# --- the driver's side -------------------------------------------------------------------------------------


@dataclass
class _Grid:
    """What SecAggPlusWorkflow asks of a grid (``send_and_receive``), over the engine's ``collect``: the
    engine's short polling instead of HttpGrid's 3 s, and every site's refusal kept, with its sentence."""

    collect: Callable[[list[Message], float], tuple[list[Message], list[str]]]
    timeout: float
    refusals: list[str] = field(default_factory=list)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies, problems = self.collect(list(messages), self.timeout if timeout is None else timeout)
        self.refusals.extend(problems)
        return replies


@dataclass
class _Strategy:
    """What SecAggPlusWorkflow asks of a legacy strategy: each site's training instructions, and the
    aggregate (the same weighted mean in every site's FitRes) with each site's metrics."""

    instructions: dict[int, FitIns]
    run_id: int
    results: dict[int, FitRes] | None = None

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any) -> list[Any]:
        return [(GridClientProxy(node, None, self.run_id), ins) for node, ins in self.instructions.items()]

    def aggregate_fit(self, server_round: int, results: list[Any], failures: list[Any]) -> tuple[Any, dict]:
        self.results = {proxy.node_id: fitres for proxy, fitres in results}
        return (results[0][1].parameters if results else None), {}


@dataclass(frozen=True)
class _Sites:
    """The client manager SecAggPlusWorkflow logs from."""

    count: int

    def num_available(self) -> int:
        return self.count


def secure_round(
    collect: Callable[[list[Message], float], tuple[list[Message], list[str]]],
    run_id: int,
    task: ConfigRecord,
    weights: Mapping[str, np.ndarray],
    train_sizes: Mapping[int, int],
    timeout: float,
) -> tuple[dict[int, RecordDict], dict[str, np.ndarray]]:
    """One training round through SecAgg+: ``task`` and ``weights`` (in the manifest's key order) to the
    sites ``train_sizes`` names (node id -> training images). Returns each site's metrics as a reply's
    records (``records.read_metrics`` reads them) and the weighted mean of the trained weights, float32;
    ``RecordError`` with the sites' sentences when the round could not complete at every site."""
    keys = list(weights)
    parameters = ndarrays_to_parameters([np.ascontiguousarray(weights[key], dtype=np.float32) for key in keys])
    nodes = sorted(train_sizes)
    strategy = _Strategy({node: FitIns(parameters, dict(task)) for node in nodes}, run_id)
    state = RecordDict(
        {
            MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: int(task["round"])}),
            MAIN_PARAMS_RECORD: ArrayRecord(),
        }
    )
    context = LegacyContext(Context(run_id, 0, {}, state, {}), strategy=strategy, client_manager=_Sites(len(nodes)))
    grid = _Grid(collect, timeout)
    workflow = SecAggPlusWorkflow(
        num_shares=1.0,  # every site shares with every other
        reconstruction_threshold=threshold(len(nodes)),
        max_weight=float(max(train_sizes.values())),
        clipping_range=CLIPPING_RANGE,
        quantization_range=quantization_range(len(nodes)),
        modulus_range=MODULUS_RANGE,
        timeout=timeout,
    )
    workflow(grid, context)
    done = strategy.results or {}
    if set(done) != set(nodes):
        said = "; ".join(dict.fromkeys(grid.refusals)) or "a site stopped answering"
        raise RecordError(f"secure aggregation stopped after {len(done)} of {len(nodes)} sites: {said}")
    mean = parameters_to_ndarrays(done[nodes[0]].parameters)
    averaged = {key: np.asarray(array, dtype=np.float32) for key, array in zip(keys, mean, strict=True)}
    return {node: metrics_records(done[node].metrics) for node in nodes}, averaged


def metrics_records(flat: Mapping[str, Any]) -> RecordDict:
    """A reply's metric records from FitRes metrics flattened by ``flat_metrics`` ('record/metric')."""
    grouped: dict[str, dict[str, float]] = {}
    for name, value in flat.items():
        record, _, metric = str(name).partition("/")
        if not metric or not isinstance(value, (int, float)) or isinstance(value, bool):
            raise RecordError(f"a site's metric {str(name)[:40]!r} is not a 'record/metric' number")
        grouped.setdefault(record, {})[metric] = float(value)
    return RecordDict({record: MetricRecord(values) for record, values in grouped.items()})


# --- a site's side -----------------------------------------------------------------------------------------


def flat_metrics(reply: RecordDict) -> dict[str, float]:
    """A site's metric records as one flat mapping ('record/metric': value), as FitRes carries metrics."""
    return {
        f"{name}/{metric}": float(value)
        for name, record in reply.metric_records.items()
        for metric, value in record.items()
    }


def is_secagg(content: RecordDict) -> bool:
    """Whether a training message is a SecAgg+ stage (else it is a plain ``train`` task)."""
    return RECORD_KEY_CONFIGS in content.config_records


def _whole(value: Any, low: int, high: int, what: str) -> int:
    if type(value) is not int or not low <= value <= high:
        raise RecordError(f"SecAgg+ {what} is {value!r:.20}, not a whole number from {low} to {high}")
    return value


def check_secagg_message(content: RecordDict, shares: int) -> None:
    """RecordError unless a SecAgg+ message holds what this project's driver sends at its stage, within the
    bounds the module names; ``shares``: the share count the site accepted at setup (0 before)."""
    configs = content.config_records[RECORD_KEY_CONFIGS]
    stage = configs.get(Key.STAGE)
    others = set(content.config_records) | set(content.array_records) | set(content.metric_records)
    expected_records = {RECORD_KEY_CONFIGS}
    if stage == Stage.COLLECT_MASKED_VECTORS:
        expected_records |= {FITINS_CONFIG, FITINS_PARAMETERS}
    if others != expected_records:
        raise RecordError(
            f"a SecAgg+ {str(stage)[:30]} message holds {sorted(others)[:6]}, not {sorted(expected_records)}"
        )
    if stage == Stage.SETUP:
        if set(configs) != SETUP_KEYS:
            raise RecordError(
                f"SecAgg+ setup holds the keys {sorted(map(str, configs))[:10]}, not {sorted(SETUP_KEYS)}"
            )
        sites = _whole(configs[Key.SAMPLE_NUMBER], 2, MAX_SITES, "sample_num")
        share_num = _whole(configs[Key.SHARE_NUMBER], 2, sites, "share_num")
        _whole(configs[Key.THRESHOLD], threshold(share_num), share_num, "threshold")
        modulus = _whole(configs[Key.MOD_RANGE], 2, MODULUS_RANGE, "mod_range")
        target = _whole(configs[Key.TARGET_RANGE], 2, MAX_QUANTIZATION_RANGE, "target_range")
        if modulus & (modulus - 1) or sites * target >= modulus:
            raise RecordError(
                f"SecAgg+ mod_range {modulus} is not a power of two above {sites} x target_range {target}"
            )
        for key in (Key.CLIPPING_RANGE, Key.MAX_WEIGHT):
            value = configs[key]
            if type(value) is not float or not 0 < value < 1e9 or not math.isfinite(value):
                raise RecordError(f"SecAgg+ {key} is {value!r:.20}, not a positive number below 1e9")
    elif stage == Stage.SHARE_KEYS:
        keys = {name: value for name, value in configs.items() if name != Key.STAGE}
        if not 2 <= len(keys) <= max(shares, 2):
            raise RecordError(f"SecAgg+ share_keys names {len(keys)} sites; setup agreed on {shares} shares")
        for name, value in keys.items():
            if not str(name).isdigit() or not isinstance(value, list) or len(value) != 2:
                raise RecordError(f"SecAgg+ share_keys entry {str(name)[:30]!r} is not a node id with two keys")
            if any(not isinstance(key, bytes) or len(key) > MAX_KEY_BYTES for key in value):
                raise RecordError(
                    f"SecAgg+ share_keys entry {name} holds a key that is not bytes of at most {MAX_KEY_BYTES}"
                )
    elif stage == Stage.COLLECT_MASKED_VECTORS:
        texts, sources = configs.get(Key.CIPHERTEXT_LIST), configs.get(Key.SOURCE_LIST)
        if set(configs) != {Key.STAGE, Key.CIPHERTEXT_LIST, Key.SOURCE_LIST} or not isinstance(texts, list):
            raise RecordError("SecAgg+ collect_masked_vectors holds other keys than stage, ctxts and srcs")
        if not isinstance(sources, list) or len(texts) != len(sources) or len(texts) >= max(shares, 1):
            raise RecordError(f"SecAgg+ collect_masked_vectors forwards {len(texts)} shares; setup agreed on {shares}")
        if any(not isinstance(text, bytes) or len(text) > MAX_CIPHERTEXT_BYTES for text in texts):
            raise RecordError(
                f"SecAgg+ collect_masked_vectors forwards a share that is not bytes of at most {MAX_CIPHERTEXT_BYTES}"
            )
    elif stage == Stage.UNMASK:
        if set(configs) != {Key.STAGE, Key.ACTIVE_NODE_ID_LIST, Key.DEAD_NODE_ID_LIST}:
            raise RecordError("SecAgg+ unmask holds other keys than stage, active_nids and dead_nids")
        listed = [configs[Key.ACTIVE_NODE_ID_LIST], configs[Key.DEAD_NODE_ID_LIST]]
        if not all(isinstance(ids, list) for ids in listed) or sum(len(ids) for ids in listed) > shares:
            raise RecordError(f"SecAgg+ unmask names more sites than the {shares} shares setup agreed on")
    else:
        raise RecordError(f"SecAgg+ stage {stage!r:.30} is none of {', '.join(Stage.all())}")


def read_fitins(content: RecordDict, keys: Callable[[RecordDict], list[str]]) -> tuple[RecordDict, list[str]]:
    """A SecAgg+ training message's task as a plain task message (``task`` and ``arrays``), and the weights'
    names in their order, which ``keys`` gives from the task record (the manifest's model)."""
    try:
        instructions = compat.recorddict_to_fitins(content, keep_input=True)
        arrays = parameters_to_ndarrays(instructions.parameters)
    except (KeyError, TypeError, ValueError) as exc:
        raise RecordError(f"the SecAgg+ training instructions cannot be read: {exc}") from exc
    task = RecordDict({records.TASK: ConfigRecord(dict(instructions.config))})
    names = keys(task)
    if len(arrays) != len(names):
        raise RecordError(f"the SecAgg+ training instructions hold {len(arrays)} arrays; the model has {len(names)}")
    task[records.ARRAYS] = ArrayRecord({name: Array.from_numpy_ndarray(array) for name, array in zip(names, arrays)})
    return task, names


def masked_train(
    message: Message,
    context: Context,
    train: Callable[[RecordDict], RecordDict],
    keys: Callable[[RecordDict], list[str]],
) -> Message:
    """A site's answer to one SecAgg+ stage: the message checked, then Flower's ``secaggplus_mod``, whose step
    at the collect stage is ``train`` (a plain task -> the site's reply: metrics, sizes, trained weights)."""
    state = context.state.config_records.get(RECORD_KEY_STATE, ConfigRecord())
    check_secagg_message(message.content, int(state.get("share_num", 0)))

    def step(inner: Message, _: Context) -> Message:
        task, names = read_fitins(inner.content, keys)
        reply = train(task)
        weights = records.record_weights(reply)
        clip = float(context.state.config_records[RECORD_KEY_STATE]["clipping_range"])
        largest = max(float(np.abs(array).max(initial=0.0)) for array in weights.values())
        if not largest <= clip:
            raise RecordError(
                f"a trained weight reaches {largest:.3g}, beyond SecAgg+'s clipping range {clip:g}: it would be "
                "clipped and the mean wrong (raise secagg.CLIPPING_RANGE at the driver)"
            )
        train_size, _ = records.read_sizes(reply)
        result = FitRes(
            Status(Code.OK, ""),
            # float64: Flower's quantiser adds the clipping range to each value in the array's own precision,
            # which in float32 would round at 2**-20 near 8; the array never leaves the site, its masks do
            ndarrays_to_parameters([weights[name].astype(np.float64) for name in names]),
            train_size,
            flat_metrics(reply),
        )
        return Message(compat.fitres_to_recorddict(result, keep_input=False), reply_to=inner)

    return secaggplus_mod(message, context, step)
