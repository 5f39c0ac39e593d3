"""The MVTec reader: index, shards, decoding, standardisation and every bad-input case."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchsvdd.data.images import read_mask
from patchsvdd.data.mvtec import (
    MVTecDataError,
    index_category,
    load_category,
    parse_rank_worldsize,
    standardise,
    training_mean,
)


def test_index_lists_everything_and_pairs_masks(tiny_root: Path) -> None:
    index = index_category(tiny_root, "fabric")
    assert len(index.train) == 8
    assert len(index.test) == 3 + 4 * 2
    assert index.defect_types == ["crack", "hole", "scratch", "stain"]
    for sample in index.test:
        if sample.defect_type == "good":
            assert sample.mask is None and sample.label == 0
        else:
            assert sample.mask.name == f"{sample.image.stem}_mask.png"
            assert sample.mask.parent.name == sample.defect_type and sample.label == 1


def test_load_resizes_converts_grayscale_and_binarises(tiny_root: Path) -> None:
    data = load_category(index_category(tiny_root, "mesh"))
    assert data.train_images.shape == (4, 256, 256, 3) and data.train_images.dtype == np.uint8
    assert np.array_equal(data.train_images[..., 0], data.train_images[..., 2])  # gray repeated
    assert data.test_masks.shape == (2 + 4, 256, 256)
    assert set(np.unique(data.test_masks)) <= {0, 1}
    assert data.test_masks[data.test_labels == 0].sum() == 0
    assert all(m.any() for m in data.test_masks[data.test_labels == 1])


def test_mask_binarised_at_128(tmp_path: Path) -> None:
    Image.fromarray(np.array([[127, 128], [0, 255]], dtype=np.uint8)).save(tmp_path / "m.png")
    assert read_mask(tmp_path / "m.png", size=2).tolist() == [[0, 1], [0, 1]]


def test_standardisation_uses_the_training_mean(tiny_root: Path) -> None:
    data = load_category(index_category(tiny_root, "fabric"))
    mean = data.mean
    assert np.allclose(mean, data.train_images.astype(np.float64).mean(0), atol=1e-4)
    assert not np.allclose(mean, data.test_images.astype(np.float64).mean(0), atol=1.0)
    test = standardise(data.test_images, mean)
    assert test.shape == (len(data.test_images), 3, 256, 256) and test.dtype == np.float32
    expected = (data.test_images[1, 10, 20].astype(np.float32) - mean[10, 20]) / 255
    assert np.allclose(test[1, :, 10, 20], expected)
    assert np.abs(standardise(data.train_images, mean).mean(0)).max() < 1e-5
    assert np.array_equal(training_mean(data.train_images), mean)


def test_shards_do_not_overlap_and_cover_everything(tiny_root: Path) -> None:
    index = index_category(tiny_root, "fabric")
    shards = [index.shard(r, 3) for r in (1, 2, 3)]
    train = [p for s in shards for p in s.train]
    test = [t.image for s in shards for t in s.test]
    assert sorted(train) == sorted(index.train) and len(set(train)) == len(train)
    assert sorted(test) == sorted(t.image for t in index.test) and len(set(test)) == len(test)
    assert index.shard(2, 3) == index_category(tiny_root, "fabric").shard(2, 3)  # deterministic
    with pytest.raises(MVTecDataError, match="rank"):
        index.shard(3, 2)
    with pytest.raises(MVTecDataError, match="cannot fill shard 9 of 9"):
        index.shard(9, 9)
    assert parse_rank_worldsize("2, 3") == (2, 3)
    with pytest.raises(MVTecDataError, match="RANK,WORLD_SIZE"):
        parse_rank_worldsize("0,2")


@pytest.mark.parametrize(
    "how",
    [
        "missing root",
        "missing category",
        "no train/good",
        "empty train/good",
        "unreadable image",
        "defect without mask",
        "mask size mismatch",
        "orphan mask",
    ],
)
def test_bad_input_is_one_clear_error(writable_category: Path, break_category, how: str) -> None:
    expected = break_category(writable_category, how)
    root = writable_category / "nowhere" if how == "missing root" else writable_category
    with pytest.raises(MVTecDataError) as err:
        index_category(root, "fabric")
    assert expected in str(err.value)


def test_truncated_png_fails_on_decode_with_its_path(writable_category: Path) -> None:
    path = writable_category / "fabric" / "train" / "good" / "003.png"
    path.write_bytes(path.read_bytes()[:2000])  # header intact, pixels cut off
    index = index_category(writable_category, "fabric")  # header still readable
    with pytest.raises(MVTecDataError, match="003.png: cannot decode"):
        load_category(index)


def test_a_relative_data_folder_is_named_absolutely(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Beside the config under the start script; the current folder under a plain ``fx envoy start``:
    either way the error names the folder really read."""
    from patchsvdd.system.configs import ENVOY_CONFIG_DIR_VAR, resolve_data_folder

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(ENVOY_CONFIG_DIR_VAR, str(tmp_path / "configs"))
    assert resolve_data_folder("data") == tmp_path / "configs" / "data"
    monkeypatch.delenv(ENVOY_CONFIG_DIR_VAR)
    assert resolve_data_folder("data") == tmp_path / "data"
    with pytest.raises(MVTecDataError, match=str(tmp_path / "data")):
        index_category(resolve_data_folder("data"), "x")
