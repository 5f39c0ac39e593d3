"""Small formatting helpers for the notebook and the demo summary (no computation)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence


def fmt(value: Any) -> str:
    """A metric for people: 4 decimals, 'n/a' for None or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Rows of dicts as a Markdown table (columns default to the first row's keys)."""
    if not rows:
        return "_(none)_"
    columns = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def metrics_rows(per_origin: Mapping[str, Mapping[str, float]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """{origin: {metric: value}} -> table rows with the origin first, aggregator last."""
    order = sorted(per_origin, key=lambda o: (o == "aggregator", o))
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
