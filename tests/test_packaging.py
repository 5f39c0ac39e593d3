"""One source for the dependencies, and a serving install without the federation's."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*")


def _requirements(path: Path) -> list[str]:
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return [line for line in lines if line]


def test_each_dependency_is_written_once_and_pyproject_reads_the_files() -> None:
    files = sorted((ROOT / "requirements").glob("*.txt"))
    names: dict[str, str] = {}
    for path in files:
        for line in _requirements(path):
            name = NAME.match(line)
            assert name, f"{path.name}: {line!r} is not a requirement"
            key = name.group(0).lower().replace("_", "-")
            assert key not in names, f"{key} is written in both {names[key]} and {path.name}"
            names[key] = path.name
    assert _requirements(ROOT / "requirements.txt") == [
        f"-r requirements/{n}" for n in ("core.txt", "federation.txt", "notebook.txt", "serve.txt")
    ]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "dependencies" not in project["project"] and "optional-dependencies" not in project["project"]
    dynamic = project["tool"]["setuptools"]["dynamic"]
    read = {
        dynamic["dependencies"]["file"][0],
        *(f for extra in dynamic["optional-dependencies"].values() for f in extra["file"]),
    }
    assert read == {f"requirements/{path.name}" for path in files}  # every file is read, none is left out


def test_the_service_imports_no_federation_or_notebook_package() -> None:
    """What the serving image leaves out (the `serve` extra) is never imported by `patchsvdd serve`."""
    code = (
        "import sys; import patchsvdd.cli.main, patchsvdd.cli.inspect_commands, patchsvdd.deploy.service; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'openfl', 'papermill', 'jupyter', 'nbclient'}))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


@pytest.mark.slow
def test_the_wheel_carries_the_station_page(tmp_path: Path) -> None:
    """`patchsvdd serve` answers / with a file beside its code: an installed package must hold it."""
    import shutil
    import zipfile

    source = tmp_path / "source"  # a copy: the build leaves build/ beside its source
    shutil.copytree(ROOT / "patchsvdd", source / "patchsvdd", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "requirements", source / "requirements")
    for name in ("pyproject.toml", "README.md", "MANIFEST.in", "requirements.txt"):
        shutil.copy(ROOT / name, source / name)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "wheel"),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    (wheel,) = (tmp_path / "wheel").glob("patchsvdd-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "patchsvdd/deploy/station.html" in names and "patchsvdd/deploy/station.py" in names
