"""Files written before the package was split into folders still load: checkpoints and bundles
of both models, written by that commit's own code, give the same maps with today's code."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from patchsvdd.data.mvtec import index_category, load_category
from patchsvdd.deploy.inspector import load_bundle
from patchsvdd.models.registry import kind_of
from patchsvdd.training.checkpoint import load_checkpoint

BEFORE_FOLDERS = "9971443"  # the last commit of the flat package
ROOT = Path(__file__).resolve().parents[1]

WRITE = """
import sys
# the old package first: an editable install's finder would otherwise answer for 'patchsvdd'
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path.insert(0, sys.argv[3])
from pathlib import Path
import numpy as np
import torch
import patchsvdd
from patchsvdd.checkpoint import save_checkpoint
from patchsvdd.data import index_category, load_category
from patchsvdd.inspector import export_bundle
from patchsvdd.models import build_model

root, out = Path(sys.argv[1]), Path(sys.argv[2])
data = load_category(index_category(root, "fabric"))
for kind in ("patchsvdd", "autoencoder"):
    torch.manual_seed(0)
    model = build_model(kind, emb_dim=16)
    save_checkpoint(model, out / f"{kind}.pt", category="fabric")
    inspector, _ = export_bundle(model, data, out / f"{kind}_bundle", bank_fraction=0.5)
    np.save(out / f"{kind}_maps.npy", inspector.maps(data.test_images[:2]))
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, out / f"{kind}_state.pt")
print(patchsvdd.__file__)
"""


def _old_package(into: Path) -> Path:
    """The package as it was at BEFORE_FOLDERS, from this checkout's history (skip where there is none)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("no git history here to take the old package from")
    run = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", BEFORE_FOLDERS, "patchsvdd"],
        capture_output=True,
        timeout=60,
    )
    if run.returncode != 0:
        pytest.skip(f"commit {BEFORE_FOLDERS} is not in this checkout's history (a shallow clone?)")
    with tarfile.open(fileobj=io.BytesIO(run.stdout)) as archive:
        archive.extractall(into, filter="data")
    return into


@pytest.mark.slow
def test_checkpoints_and_bundles_written_before_the_folders_still_load(tiny_root: Path, tmp_path: Path) -> None:
    old = _old_package(tmp_path / "old")
    out = tmp_path / "written"
    out.mkdir()
    run = subprocess.run(
        [sys.executable, "-c", WRITE, str(tiny_root), str(out), str(old)], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().startswith(str(old)), run.stdout  # the old code wrote them, not today's
    images = load_category(index_category(tiny_root, "fabric")).test_images[:2]
    for kind in ("patchsvdd", "autoencoder"):
        model, meta = load_checkpoint(out / f"{kind}.pt")
        state = torch.load(out / f"{kind}_state.pt", weights_only=True)
        assert kind_of(model) == kind and meta["category"] == "fabric"
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
        inspector = load_bundle(out / f"{kind}_bundle", device="cpu")
        assert inspector.bundle.kind == kind
        np.testing.assert_allclose(inspector.maps(images), np.load(out / f"{kind}_maps.npy"), rtol=1e-5, atol=1e-6)
