"""Real MVTec AD 'bottle' from ../shared/mvtec, where present (skipped cleanly elsewhere)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from patchsvdd.cli.main import main
from patchsvdd.data.mvtec import index_category, load_category
from patchsvdd.evaluation.metrics import METRIC_KEYS

pytestmark = pytest.mark.realdata


def test_reader_on_bottle(bottle_root: Path) -> None:
    index = index_category(bottle_root, "bottle")
    assert len(index.train) == 209 and len(index.test) == 83
    assert index.defect_types == ["broken_large", "broken_small", "contamination"]
    assert sum(s.mask is not None for s in index.test) == 63
    shard = load_category(index.shard(1, 8))
    assert shard.train_images.shape == (27, 256, 256, 3)
    assert shard.test_masks[shard.test_labels == 1].reshape(int(shard.test_labels.sum()), -1).any(axis=1).all()
    assert np.array_equal(np.unique(shard.test_masks), [0, 1])


@pytest.mark.slow
def test_evaluate_on_a_bottle_shard(bottle_root: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "untrained.pt"
    assert (
        main(
            [
                "train",
                "--data-root",
                str(bottle_root),
                "--category",
                "bottle",
                "--epochs",
                "0",
                "--out",
                str(ckpt),
                "--rank-worldsize",
                "1,8",
                "--no-progress",
            ]
        )
        == 0
    )
    out = tmp_path / "eval"
    assert (
        main(
            [
                "evaluate",
                "--data-root",
                str(bottle_root),
                "--category",
                "bottle",
                "--checkpoint",
                str(ckpt),
                "--out-dir",
                str(out),
                "--rank-worldsize",
                "1,8",
                "--search",
                "exact",
                "--no-gallery",
                "--no-progress",
            ]
        )
        == 0
    )
    report = json.loads((out / "metrics.json").read_text())
    assert report["n_train"] == 27 and report["n_test"] == 11
    assert all(0.0 <= report[k] <= 1.0 for k in METRIC_KEYS)
    assert report["seg_32"] > 0.6  # even random K=32 features localise bottle defects better than chance
