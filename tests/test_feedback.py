"""Operator feedback on a bundle: good images join the bank within its policy, defective ones recalibrate,
every change is an atomic version that rollback undoes, and a crash mid-write leaves the last version."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from patchsvdd.data.mvtec import index_category, load_category
from patchsvdd.deploy import feedback as feedback_module
from patchsvdd.deploy.bundle import read_bundle
from patchsvdd.deploy.calibration import choose_threshold
from patchsvdd.deploy.export import export_bundle, thresholds_for
from patchsvdd.deploy.feedback import teach
from patchsvdd.deploy.inspector import Inspector, load_bundle
from patchsvdd.deploy.versions import CURRENT_FILE, VersionError, current_folder, digest, history, rollback
from patchsvdd.errors import InputError
from patchsvdd.models.autoencoder.network import ConvAutoencoder
from patchsvdd.models.patchsvdd.bank import rows_per_position
from patchsvdd.models.patchsvdd.network import PatchSVDD

GRID = {64: 13 * 13, 32: 57 * 57}  # patches per image of each K (strides 16 and 4 on 256x256)


@pytest.fixture(scope="module")
def fabric(tiny_root: Path):
    torch.manual_seed(0)
    return PatchSVDD(emb_dim=16).eval(), load_category(index_category(tiny_root, "fabric"))


def _flagged(inspector: Inspector, images: np.ndarray) -> int:
    """Index of the highest-scoring image the inspector calls anomalous."""
    maps = inspector.maps(images)
    scores = maps.reshape(len(maps), -1).max(axis=1)
    assert (scores >= inspector.image_threshold.value).any(), "the test needs one flagged image"
    return int(np.argmax(np.where(scores >= inspector.image_threshold.value, scores, -np.inf)))


@pytest.mark.parametrize("fraction, subsample", [(1.0, "kcenter"), (0.5, "kcenter"), (0.5, "random")])
def test_a_false_alarm_becomes_good_without_training(fabric, tmp_path: Path, fraction: float, subsample: str) -> None:
    model, data = fabric
    inspector, _ = export_bundle(model, data, tmp_path / "b", bank_fraction=fraction, subsample=subsample)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    index = _flagged(inspector, data.test_images)
    image = data.test_images[index]
    before = read_bundle(tmp_path / "b")
    n = before.info["n_train_in_bank"]

    change = teach(tmp_path / "b", image[None], "good", request="test")

    after = load_bundle(tmp_path / "b", device="cpu")
    result = after.inspect(image)
    assert not result.anomalous and result.score < after.image_threshold.value
    assert change.version == 2 and after.bundle.info["n_train_in_bank"] == n + 1
    for k, rows in GRID.items():  # every patch of the image joins the bank, none of the bank's is dropped
        assert len(after.bundle.banks[k]) == len(before.banks[k]) + rows
        kept = {row.tobytes() for row in after.bundle.banks[k]}
        assert all(row.tobytes() in kept for row in before.banks[k])
    if subsample == "kcenter" and fraction < 1:  # still a per-position bank: keep + 1 rows at each position
        keep = rows_per_position(n, fraction)
        grid = after.bundle.banks[32].reshape(GRID[32], keep + 1, -1)
        assert np.array_equal(grid[:, :keep].reshape(-1, grid.shape[2]), before.banks[32])
    # the thresholds are chosen again by export's rule on the calibration images, scored with the new bank;
    # the image confirmed good (a calibration image here) is in the bank now and leaves that set
    stay = np.arange(len(data.test_images)) != index
    maps = after.maps(data.test_images[stay])
    image_t, pixel_t = thresholds_for(maps, data.test_labels[stay], data.test_masks[stay], None)
    assert after.image_threshold.value == pytest.approx(image_t.value)
    assert after.pixel_threshold.value == pytest.approx(pixel_t.value)
    assert change.threshold.value == pytest.approx(image_t.value)
    # no training: the model file of version 2 is the export's, byte for byte (a link or a copy)
    assert (current_folder(tmp_path / "b") / "model.pt").read_bytes() == (tmp_path / "b" / "model.pt").read_bytes()
    assert all(torch.equal(weights[k], v) for k, v in after.bundle.model.state_dict().items())


def test_versions_record_the_change_and_rollback_restores(fabric, tmp_path: Path) -> None:
    model, data = fabric
    inspector, _ = export_bundle(model, data, tmp_path / "b", bank_fraction=0.5)
    original_digest = digest(tmp_path / "b")
    image = data.test_images[_flagged(inspector, data.test_images)]
    teach(tmp_path / "b", image[None], "good", request="POST /feedback from the test")
    assert (tmp_path / "b" / CURRENT_FILE).read_text().strip() == "versions/0002"
    entry = history(tmp_path / "b")[-1]
    assert entry["version"] == 2 and entry["previous_version"] == 1 and entry["label"] == "good"
    assert entry["previous_sha256"] == original_digest and entry["request"] == "POST /feedback from the test"
    assert entry["when"] and "added to the memory banks" in entry["note"]
    second = digest(current_folder(tmp_path / "b"))
    teach(tmp_path / "b", data.train_images[:1], "good", request="second")
    assert history(tmp_path / "b")[-1]["previous_sha256"] == second

    assert rollback(tmp_path / "b") == (3, 2)
    assert rollback(tmp_path / "b") == (2, 1)
    restored = load_bundle(tmp_path / "b", device="cpu")
    assert restored.inspect(image).anomalous  # the export's bank again: the false alarm is back
    assert digest(tmp_path / "b") == original_digest and not (tmp_path / "b" / CURRENT_FILE).exists()
    with pytest.raises(VersionError, match="no previous version"):
        rollback(tmp_path / "b")
    # the next change is numbered after every version on disk: the rolled-back ones are kept
    assert teach(tmp_path / "b", image[None], "good").version == 4
    assert (tmp_path / "b" / "versions" / "0003" / "bundle.json").is_file()


def test_defective_feedback_recalibrates_by_exports_rule(fabric, tmp_path: Path) -> None:
    model, data = fabric
    inspector, calibration = export_bundle(model, data, tmp_path / "b")
    good = data.test_images[data.test_labels == 0]
    maps = inspector.maps(good)
    missed = good[int(np.argmin(maps.reshape(len(maps), -1).max(axis=1)))]  # the operator says: defective

    change = teach(tmp_path / "b", missed[None], "defective", request="test")

    folder = current_folder(tmp_path / "b")
    kept = sorted((folder / "feedback").glob("defective-*.png"))
    assert len(kept) == 1
    score = float(inspector.inspect(missed).score)
    expected = choose_threshold(
        np.concatenate([calibration.labels, [1]]), np.concatenate([calibration.scores, [score]])
    )
    assert change.threshold.value == pytest.approx(expected.value)
    assert read_bundle(tmp_path / "b").image_threshold.value == pytest.approx(expected.value)
    assert read_bundle(tmp_path / "b").banks[32].shape == inspector.bundle.banks[32].shape  # the bank is unchanged
    assert "recalibrated on" in read_bundle(tmp_path / "b").info["calibration_note"]


def test_a_failed_write_leaves_the_previous_version(fabric, tmp_path: Path, monkeypatch) -> None:
    model, data = fabric
    export_bundle(model, data, tmp_path / "b", bank_fraction=0.5)
    before = digest(tmp_path / "b")
    calls = []
    save = np.save

    def failing_save(path, array, allow_pickle=False):
        calls.append(path)
        if len(calls) == 2:  # the second bank: one new file written, the switch not yet made
            raise OSError(28, "No space left on device")
        return save(path, array, allow_pickle=allow_pickle)

    monkeypatch.setattr(feedback_module.np, "save", failing_save)
    with pytest.raises(OSError, match="No space"):
        teach(tmp_path / "b", data.train_images[:1], "good")
    monkeypatch.undo()
    assert not (tmp_path / "b" / CURRENT_FILE).exists() and digest(tmp_path / "b") == before
    assert not list((tmp_path / "b" / "versions").iterdir())  # the staging folder was removed
    assert read_bundle(tmp_path / "b").info.get("bundle_version", 1) == 1


CRASH_LOOP = """
import sys, numpy as np
from patchsvdd.deploy.feedback import teach
from patchsvdd.data.mvtec import index_category, load_category
images = load_category(index_category(sys.argv[2], "fabric")).train_images
for step in range(10_000):
    teach(sys.argv[1], images[step % len(images)][None], "good", request=f"crash test {step}")
    print(step, flush=True)
"""


@pytest.mark.slow
def test_a_killed_writer_leaves_a_loadable_version(fabric, tiny_root: Path, tmp_path: Path) -> None:
    """A process that writes versions in a loop is killed (SIGKILL) at moments spread over its writes;
    after each kill the bundle loads, its version is one that was completed, and every version's digest
    is what the next one recorded."""
    model, data = fabric
    export_bundle(model, data, tmp_path / "b", bank_fraction=0.5)
    staging_seen = 0
    for attempt in range(4):
        writer = subprocess.Popen(
            [sys.executable, "-c", CRASH_LOOP, str(tmp_path / "b"), str(tiny_root)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert writer.stdout is not None
        deadline = time.monotonic() + 120
        versions = tmp_path / "b" / "versions"
        first = writer.stdout.readline()  # one whole version written: the loop is running
        assert first, "the writer died before writing a version"
        while time.monotonic() < deadline:  # kill it while a staging folder exists, when one is seen
            if versions.is_dir() and any(p.name.startswith(".staging-") for p in os.scandir(versions)):
                staging_seen += 1
                break
            time.sleep(0.001 * attempt)
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(30)
        writer.stdout.close()
        bundle = read_bundle(tmp_path / "b")  # loads: the CURRENT version is complete
        folder = current_folder(tmp_path / "b")
        info = json.loads((folder / "bundle.json").read_text())
        assert int(folder.name) == info["bundle_version"]
        assert len(bundle.banks[32]) == info["bank_rows"]["32"]
    assert staging_seen >= 1, "no kill landed during a write"
    # every version the history names is intact: its digest is what the version after it recorded
    entries = history(tmp_path / "b")
    for entry in entries:
        previous = entry["previous_version"]
        folder = tmp_path / "b" if previous == 1 else tmp_path / "b" / "versions" / f"{previous:04d}"
        assert digest(folder) == entry["previous_sha256"]
    teach(tmp_path / "b", data.train_images[:1], "good")  # a change after the crash clears its staging folder
    assert not [p for p in (tmp_path / "b" / "versions").iterdir() if p.name.startswith(".staging-")]


def test_bad_feedback_is_refused_with_a_sentence(fabric, tmp_path: Path) -> None:
    model, data = fabric
    export_bundle(model, data, tmp_path / "b")
    with pytest.raises(InputError, match="label 'maybe'"):
        teach(tmp_path / "b", data.test_images[:1], "maybe")
    with pytest.raises(InputError, match=r"expected \(M,256,256,3\) uint8"):
        teach(tmp_path / "b", data.test_images[:1, :100], "good")
    torch.manual_seed(0)
    export_bundle(ConvAutoencoder(), data, tmp_path / "ae")
    with pytest.raises(InputError, match="keeps no memory bank"):
        teach(tmp_path / "ae", data.test_images[:1], "good")
    assert not (tmp_path / "ae" / CURRENT_FILE).exists()
