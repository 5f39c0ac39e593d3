"""Many categories in one table: ``results.md``, ``results.csv`` and a bar chart, the paper's figures beside ours.

What ``patchsvdd evaluate --category all`` writes. The paper's figures are the
per-category detection / segmentation AUROCs of Yi & Yoon, "Patch SVDD"
(ACCV 2020), as published; ours are whatever the run measured.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from patchsvdd.evaluation.metrics import METRIC_KEYS  # noqa: E402

# (detection, segmentation) AUROC published for each MVTec AD category; mean 0.921 / 0.957.
PAPER_AUROC: dict[str, tuple[float, float]] = {
    "bottle": (0.986, 0.981),
    "cable": (0.903, 0.968),
    "capsule": (0.767, 0.958),
    "carpet": (0.929, 0.926),
    "grid": (0.946, 0.962),
    "hazelnut": (0.920, 0.975),
    "leather": (0.909, 0.974),
    "metal_nut": (0.940, 0.980),
    "pill": (0.861, 0.951),
    "screw": (0.813, 0.957),
    "tile": (0.978, 0.914),
    "toothbrush": (1.000, 0.981),
    "transistor": (0.915, 0.970),
    "wood": (0.965, 0.908),
    "zipper": (0.979, 0.951),
}
TABLE_KEYS = (*METRIC_KEYS, "aupro_sum")
PAPER_KEYS = ("paper_det", "paper_seg")
MEAN = "mean"


@dataclass
class CategoryResult:
    """One category's row: its metrics (None where undefined), or the error that stopped it."""

    category: str
    metrics: dict[str, float | None] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None


def find_categories(root: str | os.PathLike) -> list[str]:
    """Names of the folders under ``root`` that look like MVTec AD categories (hold ``train/good``), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: data root does not exist")
    found = sorted(p.name for p in root.iterdir() if (p / "train" / "good").is_dir())
    if not found:
        raise FileNotFoundError(f"{root}: no category folder with train/good inside")
    return found


def table_rows(results: list[CategoryResult]) -> list[dict[str, object]]:
    """One dict per category (TABLE_KEYS, the paper's figures, seconds, status) and a last 'mean' row:
    the mean of each column over the categories that have it."""
    rows: list[dict[str, object]] = []
    for result in results:
        paper = PAPER_AUROC.get(result.category, (None, None))
        row: dict[str, object] = {"category": result.category}
        row.update({key: result.metrics.get(key) for key in TABLE_KEYS})
        row.update(dict(zip(PAPER_KEYS, paper)))
        row["seconds"] = round(result.seconds, 1)
        row["status"] = "ok" if result.error is None else f"failed: {result.error}"
        rows.append(row)
    mean: dict[str, object] = {"category": MEAN}
    for key in (*TABLE_KEYS, *PAPER_KEYS, "seconds"):
        values = [float(v) for row in rows if isinstance(v := row[key], (int, float)) and not math.isnan(v)]
        mean[key] = sum(values) / len(values) if values else None
    ok = sum(result.error is None for result in results)
    mean["status"] = f"{ok} of {len(results)} categories"
    return [*rows, mean]


def _cell(value: object) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def write_markdown(rows: list[dict[str, object]], path: Path, title: str) -> Path:
    """The table as Markdown: ours, then the paper's detection / segmentation AUROC."""
    columns = ["category", *TABLE_KEYS, *PAPER_KEYS, "seconds", "status"]
    lines = [f"# {title}", "", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in rows:
        cells = [f"{row[c]:.0f}" if c == "seconds" and row[c] is not None else _cell(row[c]) for c in columns]
        if row["category"] == MEAN:
            cells = [f"**{cell}**" for cell in cells]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "paper: Yi & Yoon, Patch SVDD (ACCV 2020), per-category detection / segmentation AUROC; "
        "aupro_sum: area under the per-region-overlap curve up to FPR 0.3, normalised (MVTec AD).",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_csv(rows: list[dict[str, object]], path: Path) -> Path:
    """The table as CSV (empty cells where undefined)."""
    columns = ["category", *TABLE_KEYS, *PAPER_KEYS, "seconds", "status"]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: "" if row[c] is None else row[c] for c in columns})
    return path


def plot_results(rows: list[dict[str, object]], path: Path) -> Path:
    """Grouped bars per category: det_sum and seg_sum measured beside the paper's detection / segmentation."""
    names = [str(row["category"]) for row in rows]
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 0.7 * len(names) + 2), 6.5), sharex=True)
    for ax, ours, paper, title in (
        (axes[0], "det_sum", "paper_det", "detection AUROC"),
        (axes[1], "seg_sum", "paper_seg", "segmentation AUROC"),
    ):
        xs = range(len(names))
        measured = [row[ours] if isinstance(row[ours], float) else math.nan for row in rows]
        published = [row[paper] if isinstance(row[paper], float) else math.nan for row in rows]
        ax.bar([x - 0.2 for x in xs], measured, width=0.4, label=f"measured ({ours})")
        ax.bar([x + 0.2 for x in xs], published, width=0.4, label="paper", alpha=0.7)
        ax.set_ylim(0.5, 1.0)
        ax.set_ylabel(title)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    axes[1].set_xticks(range(len(names)), names, rotation=45, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(results: list[CategoryResult], out_dir: str | os.PathLike, title: str) -> dict[str, Path]:
    """results.md, results.csv and results.png in ``out_dir``; returns their paths by suffix."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = table_rows(results)
    return {
        "md": write_markdown(rows, out_dir / "results.md", title),
        "csv": write_csv(rows, out_dir / "results.csv"),
        "png": plot_results(rows, out_dir / "results.png"),
    }
