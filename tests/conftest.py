"""Shared fixtures: a tiny procedural MVTec tree, where the real data lives, the notebook's parameters."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from patchsvdd.data.synth import generate_category

# The Flower engine's tests run in the Flower environment (make flower-install; make test runs them there); in the
# OpenFL environment, where flwr cannot be installed beside OpenFL 1.7.1, they are not collected.
collect_ignore_glob = [] if importlib.util.find_spec("flwr") else ["flower/*"]

# The longest test files first (a few minutes each on 2 cores: docs/benchmarks.md, "The test suite"): the
# workers (pytest-xdist, whole files) then start them at once and share out the rest while they run, instead
# of meeting one of them last.
LONGEST_FIRST = ("test_quickstart.py", "test_real_network.py", "test_federation_value.py", "test_engines_agree.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: place for place, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


REPO = Path(__file__).resolve().parents[1]
SHARED_MVTEC = Path(os.environ.get("PATCHSVDD_SHARED_MVTEC", REPO.parent / "shared" / "mvtec"))
NOTEBOOK = REPO / "workspace" / "PatchSVDD_with_Director.ipynb"


@pytest.fixture(scope="session")
def notebook_parameters() -> dict[str, object]:
    """The assignments of the notebook's cell tagged 'parameters', as Python values (its defaults)."""
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    cell = next(c for c in cells if "parameters" in c.get("metadata", {}).get("tags", []))
    tree = ast.parse("".join(cell["source"]))
    return {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)}


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only-by-convention data root with a small 'fabric' (RGB) and 'mesh' (grayscale) category."""
    root = tmp_path_factory.mktemp("mvtec")
    generate_category(root, "fabric", seed=3, n_train=8, n_test_good=3, n_test_per_defect=2, image_size=288)
    generate_category(root, "mesh", seed=3, n_train=4, n_test_good=2, n_test_per_defect=1, image_size=300)
    return root


@pytest.fixture(scope="session")
def fed_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A federation's data: fabric of 7 training images, so two shards differ in size (4 and 3) and FedAvg
    weights matter."""
    root = tmp_path_factory.mktemp("feddata")
    generate_category(root, "fabric", seed=11, n_train=7, n_test_good=2, n_test_per_defect=1, image_size=256)
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


BAD_DATA_CASES = [
    "missing root",
    "missing category",
    "no train/good",
    "empty train/good",
    "unreadable image",
    "defect without mask",
    "mask size mismatch",
    "orphan mask",
]


def _break_category(root: Path, how: str) -> str:
    """Damage the 'fabric' copy under ``root`` in one way; returns the text the error must contain."""
    cat = root / "fabric"
    if how == "missing root":
        return str(root / "nowhere")
    if how == "missing category":
        shutil.rmtree(cat)
        return str(cat)
    if how == "no train/good":
        shutil.rmtree(cat / "train" / "good")
        return "train/good not found"
    if how == "empty train/good":
        for p in (cat / "train" / "good").iterdir():
            p.unlink()
        return "no training images"
    if how == "unreadable image":
        (cat / "test" / "hole" / "001.png").write_bytes(b"\x89PNG garbage")
        return str(cat / "test" / "hole" / "001.png")
    if how == "defect without mask":
        (cat / "ground_truth" / "crack" / "000_mask.png").unlink()
        return str(cat / "test" / "crack" / "000.png")
    if how == "mask size mismatch":
        Image.new("L", (100, 100)).save(cat / "ground_truth" / "stain" / "001_mask.png")
        return str(cat / "ground_truth" / "stain" / "001_mask.png")
    if how == "orphan mask":
        shutil.copy(cat / "ground_truth" / "stain" / "001_mask.png", cat / "ground_truth" / "stain" / "007_mask.png")
        return str(cat / "ground_truth" / "stain" / "007_mask.png")
    if how == "truncated png":
        path = cat / "train" / "good" / "003.png"
        path.write_bytes(path.read_bytes()[:2000])  # header intact, pixels cut off
        return f"{path}: cannot decode"
    raise AssertionError(how)


@pytest.fixture
def break_category():
    """``break_category(root, how)``: damage the copy of 'fabric' under ``root``; returns the expected error text."""
    return _break_category
