"""Shared fixtures: a tiny procedural MVTec tree, and where the real data lives."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from patchsvdd.synth import generate_category

REPO = Path(__file__).resolve().parents[1]
SHARED_MVTEC = Path(os.environ.get("PATCHSVDD_SHARED_MVTEC", REPO.parent / "shared" / "mvtec"))


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only-by-convention data root with a small 'fabric' (RGB) and 'mesh' (grayscale) category."""
    root = tmp_path_factory.mktemp("mvtec")
    generate_category(root, "fabric", seed=3, n_train=8, n_test_good=3, n_test_per_defect=2, image_size=288)
    generate_category(root, "mesh", seed=3, n_train=4, n_test_good=2, n_test_per_defect=1, image_size=300)
    return root


@pytest.fixture
def writable_category(tiny_root: Path, tmp_path: Path) -> Path:
    """A private copy of tiny 'fabric' that a test may break; returns its data root."""
    shutil.copytree(tiny_root / "fabric", tmp_path / "fabric")
    return tmp_path


@pytest.fixture(scope="session")
def bottle_root() -> Path:
    """Root holding the real MVTec AD 'bottle' category; skips where ../shared/mvtec is absent."""
    if not (SHARED_MVTEC / "bottle" / "train" / "good").is_dir():
        pytest.skip(f"real MVTec data not found at {SHARED_MVTEC}/bottle")
    return SHARED_MVTEC
