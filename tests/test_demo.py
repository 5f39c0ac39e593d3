"""The demo's choice of starting model (fresh, released, a checkpoint) and its parser defaults."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from patchsvdd.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from patchsvdd.demo import FINETUNE_LR, FRESH_LR, build_parser, initial_checkpoint
from patchsvdd.model import PatchSVDD
from patchsvdd.released import SHA256, ReleasedWeightsError

OFFICIAL = Path(os.environ.get("PATCHSVDD_SHARED_OFFICIAL", Path(__file__).resolve().parents[2] / "shared" / "official"))


def test_fresh_and_project_checkpoints(tmp_path: Path) -> None:
    assert initial_checkpoint("fresh", "washer", tmp_path) is None
    ckpt = save_checkpoint(PatchSVDD(emb_dim=16), tmp_path / "start.pt", round=3)
    assert initial_checkpoint(str(ckpt), "washer", tmp_path) == ckpt.resolve()
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="broken.pt: not a readable checkpoint"):
        initial_checkpoint(str(tmp_path / "broken.pt"), "washer", tmp_path)
    with pytest.raises(ReleasedWeightsError, match="category 'washer'"):  # no released encoder for demo data
        initial_checkpoint("official", "washer", tmp_path)


def test_the_released_encoder_is_imported_into_the_run_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    official = OFFICIAL / "bottle_enchier.pkl"
    if not official.is_file():
        pytest.skip(f"released bottle encoder not found at {official}")
    path = initial_checkpoint(str(official), "bottle", tmp_path)
    model, meta = load_checkpoint(path)
    assert path == tmp_path / "initial.pt" and meta["imported"]["sha256"] == SHA256["bottle"]
    released = torch.load(official, map_location="cpu", weights_only=True)
    assert torch.equal(model.encoder.combine.weight, released["conv1.weight"])
    # 'official' takes the pinned file from the cache without any network
    monkeypatch.setenv("PATCHSVDD_CACHE", str(tmp_path / "cache"))
    cached = tmp_path / "cache" / "released" / "bottle" / "enchier.pkl"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(official.read_bytes())
    assert load_checkpoint(initial_checkpoint("official", "bottle", tmp_path / "run2"))[1]["imported"]["pinned"]


def test_parser_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INIT", "official")
    monkeypatch.setenv("MAX_STEPS", "7")
    args = build_parser().parse_args([])
    assert args.init == "official" and args.max_steps == 7 and args.lr is None  # lr: chosen by init in main
    assert FINETUNE_LR < FRESH_LR
