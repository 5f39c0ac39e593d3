"""Pictures: anomaly-map galleries on one colour scale per category, ROC curves, metrics per round.

matplotlib only (Agg when saving). Nothing here computes scores.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import roc_curve

CMAP = "jet"


def colour_range(maps: np.ndarray, upper_percentile: float = 99.9) -> tuple[float, float]:
    """One (vmin, vmax) for every map of a category (M,H,W), so good images stay cool."""
    return float(maps.min()), float(np.percentile(maps, upper_percentile))


def _draw_pair(
    ax_img, ax_map, image: np.ndarray, mask: np.ndarray, amap: np.ndarray, vmin: float, vmax: float, title: str
):
    ax_img.imshow(image)
    if mask.any():
        ax_img.contour(mask, levels=[0.5], colors="lime", linewidths=1.0)
    ax_img.set_title(title, fontsize=8)
    shown = ax_map.imshow(amap, cmap=CMAP, vmin=vmin, vmax=vmax)
    ax_map.set_title(f"max {amap.max():.3g}", fontsize=8)
    for ax in (ax_img, ax_map):
        ax.set_axis_off()
    return shown


def save_gallery(
    out_dir: str | Path,
    images: np.ndarray,
    masks: np.ndarray,
    maps: np.ndarray,
    names: Sequence[str],
) -> list[Path]:
    """One PNG per test image: the image with its mask outlined beside its map.

    images uint8 (M,H,W,3), masks (M,H,W) 0/1, maps (M,H,W); every map uses the
    same colour scale. Returns the written paths.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vmin, vmax = colour_range(maps)
    fig, (ax_img, ax_map) = plt.subplots(1, 2, figsize=(6, 3.2))
    paths = []
    for image, mask, amap, name in zip(images, masks, maps, names):
        ax_img.clear()
        ax_map.clear()
        _draw_pair(ax_img, ax_map, image, mask, amap, vmin, vmax, name)
        path = out_dir / (name.replace("/", "_") + ".png")
        fig.savefig(path, dpi=80, bbox_inches="tight")
        paths.append(path)
    plt.close(fig)
    return paths


def gallery_figure(
    images: np.ndarray, masks: np.ndarray, maps: np.ndarray, names: Sequence[str], max_images: int = 8
) -> plt.Figure:
    """A grid of (image with mask outline, map) pairs for a notebook, good and defective images mixed."""
    vmin, vmax = colour_range(maps)
    chosen = spread_over_types(names, masks, max_images)
    rows = max(1, (len(chosen) + 1) // 2)
    fig, axes = plt.subplots(rows, 4, figsize=(12, 3 * rows), squeeze=False)
    shown = None
    for slot in range(rows * 2):
        ax_img, ax_map = axes[slot // 2, (slot % 2) * 2], axes[slot // 2, (slot % 2) * 2 + 1]
        if slot >= len(chosen):
            ax_img.set_axis_off()
            ax_map.set_axis_off()
            continue
        i = chosen[slot]
        shown = _draw_pair(ax_img, ax_map, images[i], masks[i], maps[i], vmin, vmax, names[i])
    if shown is not None:
        fig.colorbar(shown, ax=axes.ravel().tolist(), shrink=0.6, label="anomaly score")
    return fig


def spread_over_types(names: Sequence[str], masks: np.ndarray, count: int) -> list[int]:
    """Indices of up to ``count`` images taking turns over the types ('good', then each defect; names 'type/stem')."""
    by_type: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        kind = name.split("/")[0] if "/" in name else ("defect" if masks[i].any() else "good")
        by_type.setdefault(kind, []).append(i)
    queues = [by_type.pop("good", [])] + [by_type[k] for k in sorted(by_type)]
    chosen: list[int] = []
    while len(chosen) < count and any(queues):
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.append(queue.pop(0))
    return chosen


def plot_roc(labels: np.ndarray, scores: Mapping[str, np.ndarray], path: str | Path | None = None) -> plt.Figure:
    """Detection ROC curve of each fusion's image scores; saved to ``path`` when given."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    if np.unique(labels).size > 1:
        for fusion, values in scores.items():
            fpr, tpr, _ = roc_curve(labels, values)
            ax.plot(fpr, tpr, label=fusion)
    else:
        ax.text(0.5, 0.5, "one class only:\nROC undefined", ha="center", va="center")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("detection ROC")
    if np.unique(labels).size > 1:
        ax.legend(loc="lower right", fontsize=8)
    if path is not None:
        fig.savefig(path, dpi=100, bbox_inches="tight")
    return fig


def plot_rounds(series: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]]) -> plt.Figure:
    """One panel per metric name, one line per origin: {name: {origin: [(round, value), ...]}}."""
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(series), figsize=(5.3 * len(series), 4), squeeze=False)
    for ax, (name, lines) in zip(axes[0], series.items()):
        for origin, points in sorted(lines.items()):
            if points:
                ax.plot(*zip(*points), marker="o", label=origin)
        ax.set_title(name)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return fig


def save_prediction(
    path: str | Path, image: np.ndarray, amap: np.ndarray, vmin: float, vmax: float, pixel_threshold: float, title: str
) -> Path:
    """One PNG: the image with the region above ``pixel_threshold`` outlined, beside its map on the
    bundle's colour scale (``vmin``..``vmax``). image uint8 (H,W,3), amap (H,W)."""
    fig, (ax_img, ax_map) = plt.subplots(1, 2, figsize=(6, 3.2))
    _draw_pair(ax_img, ax_map, image, (amap >= pixel_threshold).astype(np.uint8), amap, vmin, vmax, title)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def plot_roc_point(
    labels: np.ndarray, scores: np.ndarray, fpr: float | None, tpr: float | None, path: str | Path
) -> Path:
    """Detection ROC of one score with the chosen operating point marked; saved to ``path``."""
    fig = plot_roc(labels, {"sum": scores})
    if fpr is not None and tpr is not None:
        fig.axes[0].plot([fpr], [tpr], "o", color="red", label="threshold")
        fig.axes[0].legend(loc="lower right", fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def federation_value_figure(rows: Sequence[Mapping], title: str, metric: str = "det_sum") -> plt.Figure:
    """Per site, bars of ``metric`` for each way of training (alone / federated / pooled) with their 95 %
    bootstrap intervals (``det_low``/``det_high`` of the rows; rows as ``bench_federation_value`` writes)."""
    ways = list(dict.fromkeys(row["way"] for row in rows))
    sites = list(dict.fromkeys(row["site"] for row in rows if "det_low" in row))
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(sites), 3.2))
    width = 0.8 / len(ways)
    for k, way in enumerate(ways):
        chosen = [next(r for r in rows if r["site"] == site and r["way"] == way) for site in sites]
        values = np.array([r[metric] for r in chosen], dtype=float)
        errors = np.array([[v - r["det_low"], r["det_high"] - v] for v, r in zip(values, chosen, strict=True)]).T
        ax.bar(
            np.arange(len(sites)) + (k - (len(ways) - 1) / 2) * width,
            values,
            width,
            yerr=errors,
            capsize=3,
            label=way,
            hatch=("", "//", "..")[k % 3],
            edgecolor="black",
        )
    ax.set_xticks(np.arange(len(sites)), sites, fontsize=8)
    ax.set_ylabel(f"{metric} (95 % interval)")
    ax.set_ylim(0.0, 1.05)
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    return fig
