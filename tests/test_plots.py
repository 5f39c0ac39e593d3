"""Pictures: one colour scale per category, every type in the gallery, single-class ROC, round plots."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402

from patchsvdd.evaluation import plots  # noqa: E402


def _maps(n: int = 6) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (n, 16, 16, 3), dtype=np.uint8)
    masks = np.zeros((n, 16, 16), dtype=np.uint8)
    masks[2:, 4:8, 4:8] = 1
    maps = rng.random((n, 16, 16)).astype(np.float32)
    names = ["good/000", "good/001", "crack/000", "crack/001", "hole/000", "hole/001"][:n]
    return images, masks, maps, names


def test_colour_range_is_shared_by_the_category() -> None:
    maps = np.stack([np.full((4, 4), 0.1), np.full((4, 4), 5.0)])
    vmin, vmax = plots.colour_range(maps)
    assert vmin == 0.1 and vmax == 5.0  # the quiet image is drawn on the loud image's scale


def test_gallery_files_and_figure_cover_every_type(tmp_path: Path) -> None:
    images, masks, maps, names = _maps()
    paths = plots.save_gallery(tmp_path, images, masks, maps, names)
    assert sorted(p.name for p in paths) == sorted(n.replace("/", "_") + ".png" for n in names)
    assert plots.spread_over_types(names, masks, 3) == [0, 2, 4]  # good, crack, hole
    fig = plots.gallery_figure(images, masks, maps, names, max_images=4)
    assert sum(1 for ax in fig.axes if ax.images) == 8  # 4 pairs of image and map


def test_roc_and_round_plots(tmp_path: Path) -> None:
    plots.plot_roc(np.array([0, 1, 0, 1]), {"sum": np.array([0.1, 0.9, 0.2, 0.8])}, tmp_path / "roc.png")
    plots.plot_roc(np.zeros(3), {"sum": np.arange(3.0)}, tmp_path / "single.png")  # one class: no crash
    fig = plots.plot_rounds({"loss": {"aggregator": [(0, 4.2), (1, 4.1)]}, "det": {"envoy_1": [(0, 0.9)]}})
    assert len(fig.axes) == 2 and (tmp_path / "roc.png").is_file() and (tmp_path / "single.png").is_file()
