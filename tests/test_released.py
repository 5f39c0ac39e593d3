"""Importing the authors' released encoders: key and shape checks, weights-only reading, pinned downloads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from patchsvdd.cli.main import main
from patchsvdd.models.patchsvdd.network import PatchSVDD
from patchsvdd.models.patchsvdd.released import (
    SHA256,
    ReleasedWeightsError,
    download,
    import_released,
    key_map,
    to_model,
)
from patchsvdd.training.checkpoint import load_checkpoint

OFFICIAL = Path(
    os.environ.get("PATCHSVDD_SHARED_OFFICIAL", Path(__file__).resolve().parents[2] / "shared" / "official")
)


def _released_like(model: PatchSVDD) -> dict[str, torch.Tensor]:
    """A state dict in the released layout holding ``model``'s encoder weights."""
    ours = model.state_dict()
    return {released: ours[key].clone() for released, key in key_map(model).items()}


def test_mapping_puts_every_released_weight_in_its_layer() -> None:
    torch.manual_seed(0)
    source = PatchSVDD()
    model = to_model(_released_like(source))
    for key, value in source.state_dict().items():
        if key.startswith("encoder."):
            assert torch.equal(model.state_dict()[key], value), key
    assert len(key_map(model)) == 20  # 8 + 2 convolutions, weight and bias


def test_wrong_keys_and_shapes_are_named() -> None:
    state = _released_like(PatchSVDD())
    bad = dict(state)
    bad["enc.conv3.weight"] = torch.zeros(128, 64, 5, 5)
    with pytest.raises(
        ReleasedWeightsError, match=r"enc.conv3.weight has shape \(128, 64, 5, 5\), expected \(128, 64, 3, 3\)"
    ):
        to_model(bad, "x.pkl")
    missing = {k: v for k, v in state.items() if k != "conv2.bias"}
    with pytest.raises(ReleasedWeightsError, match=r"x.pkl: keys missing \['conv2.bias'\], unexpected none"):
        to_model(missing, "x.pkl")


def test_files_are_read_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "evil.pkl"
    torch.save({"enc.conv1.weight": torch.zeros(1), "hook": Path("/")}, path)  # a pickled object, not only tensors
    with pytest.raises(ReleasedWeightsError, match="evil.pkl: not a weights-only torch file"):
        import_released("bottle", path)
    with pytest.raises(ReleasedWeightsError, match="category 'bottles'"):
        import_released("bottles", path)


def test_a_truncated_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "enchier.pkl"
    torch.save(_released_like(PatchSVDD()), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # an interrupted download
    with pytest.raises(ReleasedWeightsError, match="enchier.pkl: not a weights-only torch file"):
        import_released("bottle", path)


def test_no_network_gives_one_sentence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATCHSVDD_CACHE", str(tmp_path))
    with pytest.raises(
        ReleasedWeightsError, match="cannot download http://127.0.0.1:9/x.pkl .*--source PATH or put it at"
    ):
        download("bottle", "http://127.0.0.1:9/x.pkl", timeout=5)
    assert not list(tmp_path.rglob("*.part"))


def test_a_download_with_another_hash_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATCHSVDD_CACHE", str(tmp_path / "cache"))
    other = tmp_path / "other.pkl"
    torch.save(_released_like(PatchSVDD()), other)
    with pytest.raises(ReleasedWeightsError, match="is not the pinned"):
        download("bottle", other.as_uri())
    assert not (tmp_path / "cache" / "released" / "bottle" / "enchier.pkl").exists()


@pytest.mark.realdata
def test_import_the_released_bottle_encoder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    official = OFFICIAL / "bottle_enchier.pkl"
    if not official.is_file():
        pytest.skip(f"released bottle encoder not found at {official}")
    out = tmp_path / "bottle.pt"
    assert main(["import-weights", "--category", "bottle", "--source", str(official), "--out", str(out)]) == 0
    model, meta = load_checkpoint(out)
    assert meta["imported"]["sha256"] == SHA256["bottle"] and meta["imported"]["pinned"]
    released = torch.load(official, map_location="cpu", weights_only=True)  # saved from a GPU
    assert torch.equal(model.encoder.combine.weight, released["conv1.weight"])
    assert torch.equal(model.encoder.small.layers[14].bias, released["enc.conv8.bias"])
    # the pinned download path finds it in the cache without any network
    monkeypatch.setenv("PATCHSVDD_CACHE", str(tmp_path / "cache"))
    cached = tmp_path / "cache" / "released" / "bottle" / "enchier.pkl"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(official.read_bytes())
    assert download("bottle", "http://127.0.0.1:9/unused") == cached
