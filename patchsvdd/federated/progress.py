"""What an experiment reports and how it is followed, whatever engine runs it: the names of the metrics a round,
the final evaluation and an export report, the log of streamed metrics, one line per round, and the
checkpointer that keeps the best model. No federation engine is imported here.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patchsvdd.evaluation.metrics import aupro_keys, metric_keys
from patchsvdd.federated.rounds import round_of, untagged
from patchsvdd.models.registry import family
from patchsvdd.settings import HELDOUT_METRICS

DEFECT_FUSION = "sum"  # the fusion whose image scores the final evaluation reports per defect type (both models)
EXPORT_METRICS = (
    "image_threshold",
    "image_fpr",
    "image_tpr",
    "pixel_threshold",
    "calibrated",
    "bundle_mb",
    "bank_rows_32",
)
VALIDATION = "aggregated_model_validate"  # the task whose metrics rounds, evaluation and export report


def round_metrics(model: str) -> tuple[str, ...]:
    """What each round's validation reports for ``model`` (a registry name): its held-out criterion, det_sum
    and seg_sum."""
    return (family(model).heldout_metric, "det_sum", "seg_sum")


def final_metrics(model: str) -> tuple[str, ...]:
    """What the final evaluation reports for ``model``: det/seg AUROC and AUPRO of each of its fusions."""
    fusions = family(model).fusions
    return metric_keys(fusions) + aupro_keys(fusions)


def train_metrics(model: str) -> tuple[str, ...]:
    """What a round's training reports for ``model`` ('train_loss' first)."""
    return family(model).train_metrics


@dataclass
class MetricLog:
    """Metrics as streamed: dicts with round, metric_origin, task_name, metric_name, metric_value."""

    records: list[dict[str, Any]] = field(default_factory=list)

    def series(self, task_name: str, metric_name: str) -> dict[str, list[tuple[int, float]]]:
        """{origin: [(round, value), ...]} for one task and metric."""
        out: dict[str, list[tuple[int, float]]] = {}
        for r in self.records:
            if r["task_name"] == task_name and r["metric_name"] == metric_name:
                out.setdefault(r["metric_origin"], []).append((int(r["round"]), float(r["metric_value"])))
        return out

    def final(self, task_name: str = VALIDATION) -> dict[str, dict[str, float]]:
        """{origin: {metric: value}} from the last round each origin reported for ``task_name``."""
        out: dict[str, dict[str, tuple[int, float]]] = {}
        for r in self.records:
            if r["task_name"] == task_name:
                slot = out.setdefault(r["metric_origin"], {})
                if r["metric_name"] not in slot or slot[r["metric_name"]][0] <= r["round"]:
                    slot[r["metric_name"]] = (int(r["round"]), float(r["metric_value"]))
        return {origin: {k: v for k, (_, v) in metrics.items()} for origin, metrics in out.items()}

    def to_jsonable(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.records]


class RoundLines:
    """One line per round as the metrics stream in (pass as ``follow_metrics``'s ``on_metric``): the round,
    seconds since the previous line, and each of ``keys`` aggregated with every site's value, e.g.
    ``round 2/5   41 s  heldout_pos 2.108 (envoy_1 2.102, envoy_2 2.114)  det_sum ...``.

    A round's line is written when the aggregator's values of all ``keys`` for it have arrived (OpenFL
    streams a task's aggregate after every site's value). ``rounds``: training rounds, for 'r/rounds' (the
    last, validation-only round is rounds itself). ``write`` takes each line (default: print, flushed).
    """

    def __init__(
        self,
        keys: tuple[str, ...],
        rounds: int | None = None,
        task: str = VALIDATION,
        write: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.keys, self.rounds, self.task, self.clock = keys, rounds, task, clock
        self.write = write if write is not None else (lambda line: print(line, flush=True))
        self.values: dict[int, dict[str, dict[str, float]]] = {}  # round -> key -> origin -> value
        self.written: set[int] = set()
        self.last = clock()

    def __call__(self, record: dict[str, Any]) -> None:
        if record["task_name"] != self.task or record["metric_name"] not in self.keys:
            return
        number = int(record["round"])
        by_key = self.values.setdefault(number, {})
        by_key.setdefault(record["metric_name"], {})[record["metric_origin"]] = float(record["metric_value"])
        if number not in self.written and all("aggregator" in by_key.get(key, {}) for key in self.keys):
            self.written.add(number)
            now = self.clock()
            self.write(self.line(number, now - self.last))
            self.last = now

    def line(self, number: int, seconds: float) -> str:
        """The line of round ``number`` from the values received so far."""
        of = f"/{self.rounds}" if self.rounds is not None else ""
        parts = [f"round {number}{of} {seconds:5.0f} s"]
        for key in self.keys:
            origins = self.values[number].get(key, {})
            sites = ", ".join(
                f"{origin} {value:.3f}" for origin, value in sorted(origins.items()) if origin != "aggregator"
            )
            parts.append(f"{key} {origins['aggregator']:.3f} ({sites})")
        return "  ".join(parts)


class SaveWhenImproved:
    """Saves the validated aggregate atomically each time it beats the best so far (pass to ``follow_metrics``).

    The criterion is ``metric`` of the aggregator's validation: by default the
    held-out position loss ('heldout_pos', lower is better), which needs no
    anomalous image, so the test images whose AUROC is reported never choose
    the model. Round r's aggregated validation scores the model round r started
    with; the director holds that model as "last" from the end of round r until
    the end of round r+1. So an improvement seen in round r is saved when the
    first metric of a later round arrives (round r+1 is then under way), or
    when the experiment ends. The director streams metrics with up to a
    second's delay, so a round r+1 shorter than that (toy test rounds, never a
    real one) can end first: the model fetched then says so by its round tag
    (``rounds.py``; OpenFL 1.7.1 itself tells no round), and it is not saved
    under round r's score: the round goes to ``missed`` with a warning, and
    the file and ``best_score`` stay those of the model saved before.
    ``fetch`` (default: the experiment's last model) is called once per save.
    ``save_checkpoint`` writes a temporary file and renames it: a crash never
    leaves a broken file.
    ``metadata`` goes into the file, with the round and the score.
    """

    def __init__(
        self,
        experiment: Any,
        path: str | os.PathLike,
        /,
        metric: str = HELDOUT_METRICS["patchsvdd"],
        lower_is_better: bool = True,
        fetch: Callable[[], Any] | None = None,
        **metadata: Any,
    ) -> None:
        self.path, self.metric, self.metadata = Path(path), metric, metadata
        if fetch is None and experiment is None:
            raise ValueError("SaveWhenImproved needs an experiment or a fetch function")
        self.fetch = fetch if fetch is not None else experiment.get_last_model
        self.lower_is_better = lower_is_better
        self.best_score = math.inf if lower_is_better else -math.inf
        self.best_round: int | None = None
        self.saved_round: int | None = None  # round of the model in ``path``, once written
        self.missed: list[int] = []  # improvements whose model the director had replaced before it was fetched
        self._pending: tuple[int, float] | None = None
        self._saved_score = self.best_score

    def _better(self, score: float) -> bool:
        return not math.isnan(score) and (score < self.best_score if self.lower_is_better else score > self.best_score)

    def observe(self, record: dict[str, Any]) -> None:
        """Look at one streamed metric: save a pending improvement once a later round reports."""
        if self._pending is not None and record["round"] > self._pending[0]:
            self._save()
        key = (record["metric_origin"], record["task_name"], record["metric_name"])
        score = record["metric_value"]
        if key == ("aggregator", "aggregated_model_validate", self.metric) and self._better(score):
            self.best_score, self.best_round = score, int(record["round"])
            self._pending = (self.best_round, score)

    def finish(self) -> None:
        """The experiment ended: save the pending improvement, if any."""
        if self._pending is not None:
            self._save()

    def _save(self) -> None:
        from patchsvdd.training.checkpoint import save_checkpoint

        if self._pending is None:
            return
        round_number, score = self._pending
        self._pending = None
        model = self.fetch()
        fetched = round_of(model)
        if fetched is not None and fetched != round_number:
            self.missed.append(round_number)
            self.best_score, self.best_round = self._saved_score, self.saved_round
            warnings.warn(
                f"the model validated in round {round_number} ({self.metric} {score:.4f}) was replaced on the "
                f"director by round {fetched}'s before it could be fetched (a round shorter than the metric "
                f"stream's delay); {self.path} keeps round {self.saved_round}'s",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        save_checkpoint(
            untagged(model), self.path, round=round_number, score=float(score), metric=self.metric, **self.metadata
        )
        self.saved_round, self._saved_score = round_number, score
