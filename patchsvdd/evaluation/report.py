"""Small formatting helpers for the notebook and the demo summary (no computation)."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

FRAMEWORK_LOGGERS = ("openfl", "grpc", "faiss", "py.warnings")


def log_framework_to(path: str | Path, loggers: Sequence[str] = FRAMEWORK_LOGGERS) -> Path:
    """Send the frameworks' log lines and Python warnings to the file ``path`` instead of the notebook's
    cells, which then show only what the project prints: tables, one line per round, pictures."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.captureWarnings(True)
    for name in loggers:
        logger = logging.getLogger(name)
        logger.handlers = [handler]  # in place of any console handler
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return path


# Columns that hold counts and yes/no answers, which travel as floats (OpenFL's metrics are floats)
COUNT_COLUMNS = frozenset({"n", "steps", "rounds", "bank_rows_32", "rows_32", "train", "test"})
YES_NO_COLUMNS = frozenset({"calibrated", "online", "chosen"})


def fmt(value: Any, column: str | None = None) -> str:
    """A value for people: a metric with 4 decimals, a count of ``COUNT_COLUMNS`` as a whole number, an answer of
    ``YES_NO_COLUMNS`` as yes/no, 'n/a' for None or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if column in YES_NO_COLUMNS and isinstance(value, (bool, int, float)):
        return "yes" if value else "no"
    if column in COUNT_COLUMNS and isinstance(value, float) and value.is_integer():
        return f"{int(value):,}"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Rows of dicts as a Markdown table (columns default to the first row's keys), each cell by ``fmt``."""
    if not rows:
        return "_(none)_"
    columns = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c), c) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def final_evaluation(
    values: Mapping[str, Mapping[str, float]], fusion: str = "sum"
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, dict[str, float]]]]:
    """The final evaluation's streamed metrics {origin: {metric: value}} as (per-node metrics, with a
    'pooled' row: det_/seg_<fusion> of all sites' test images together, from their score sketches; per-node
    defect tables, envoys only). The aggregator's mean of sketches and defect statistics is dropped."""
    from patchsvdd.evaluation.metrics import split_defects
    from patchsvdd.evaluation.pooling import pooled_aurocs, split_sketches

    per_node: dict[str, dict[str, float]] = {}
    per_defect: dict[str, dict[str, dict[str, float]]] = {}
    sketches: dict[str, dict[str, float]] = {}
    for node, metrics in values.items():
        plain, sketch = split_sketches(metrics)
        per_node[node], table = split_defects(plain)
        if node != "aggregator":
            per_defect[node] = table
            if sketch:
                sketches[node] = sketch
    if sketches:
        per_node["pooled"] = pooled_aurocs(sketches, fusion)  # type: ignore[assignment]  # None: undefined AUROC
    return per_node, per_defect


def test_set_sizes(per_defect: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, tuple[int, int]]:
    """(good, defective) test images per node from the final evaluation's per-defect tables
    ({node: {type: {"n": count, ...}}}, 'good' among the types)."""
    from patchsvdd.data.mvtec import GOOD

    sizes = {}
    for node, table in per_defect.items():
        counts = {name: int(row.get("n") or 0) for name, row in table.items()}
        sizes[node] = (counts.get(GOOD, 0), sum(n for name, n in counts.items() if name != GOOD))
    return sizes


def metrics_rows(per_origin: Mapping[str, Mapping[str, float]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """{origin: {metric: value}} -> table rows with the origin first, then aggregator, then pooled."""
    order = sorted(per_origin, key=lambda o: (o == "pooled", o == "aggregator", o))
    return [{"node": o, **{k: per_origin[o].get(k) for k in keys}} for o in order]


def write_json(path: str | Path, payload: Any) -> Path:
    """Write ``payload`` as indented JSON (NaN written as null)."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean(payload), indent=2))
    return path


LEARNING_METRICS = ("heldout_pos", "det_sum", "seg_sum")


def untrained_vs_trained(
    records: Sequence[Mapping[str, Any]],
    metrics: Sequence[str] = LEARNING_METRICS,
    task: str = "aggregated_model_validate",
) -> list[dict[str, Any]]:
    """Rows per origin (envoys, then aggregator): each metric at round 0, which validates the initial model,
    beside the last round, which validates the final aggregate. ``records`` as streamed (round_metrics.json)."""
    first: dict[str, dict[str, tuple[int, float]]] = {}
    last: dict[str, dict[str, tuple[int, float]]] = {}
    for r in records:
        if r["task_name"] != task or r["metric_name"] not in metrics:
            continue
        key, point = r["metric_name"], (int(r["round"]), r["metric_value"])
        slot_first, slot_last = first.setdefault(r["metric_origin"], {}), last.setdefault(r["metric_origin"], {})
        if key not in slot_first or point[0] < slot_first[key][0]:
            slot_first[key] = point
        if key not in slot_last or point[0] >= slot_last[key][0]:
            slot_last[key] = point
    rows = []
    for origin in sorted(first, key=lambda o: (o == "aggregator", o)):
        row: dict[str, Any] = {"node": origin}
        for key in metrics:
            row[f"{key} untrained"] = first[origin].get(key, (None, None))[1]
            row[f"{key} trained"] = last[origin].get(key, (None, None))[1]
        rows.append(row)
    return rows
