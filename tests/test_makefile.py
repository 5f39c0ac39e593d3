"""The Makefile's choice of Python: OpenFL 1.7.1 installs on 3.10-3.12 only."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAKE = shutil.which("make")
pytestmark = pytest.mark.skipif(MAKE is None or sys.platform == "win32", reason="needs make and a POSIX shell")


def _fake_python(folder: Path, name: str, version: str) -> None:
    """A ``name`` on PATH that says it is ``version`` and fails the Makefile's version check (as 3.13 does)."""
    path = folder / name
    path.write_text(f"#!/bin/sh\n[ \"$1\" = --version ] && {{ echo 'Python {version}'; exit 0; }}\nexit 1\n")
    path.chmod(0o755)


def _make(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": str(tmp_path / "bin"), "HOME": str(tmp_path)}
    return subprocess.run(
        [MAKE, "-C", str(ROOT), f"VENV={tmp_path / 'venv'}", *args], env=env, text=True, capture_output=True, timeout=60
    )


def test_another_python3_is_passed_over_for_a_supported_one(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    _fake_python(tmp_path / "bin", "python3", "3.13.1")
    os.symlink(sys.executable, tmp_path / "bin" / f"python3.{sys.version_info.minor}")  # the tests run on 3.10-3.12
    run = _make(tmp_path, "-n", "install")
    assert run.returncode == 0, run.stderr
    assert f"python3.{sys.version_info.minor} -m venv {tmp_path / 'venv'}" in run.stdout


def test_without_a_supported_python_make_says_what_to_install(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    _fake_python(tmp_path / "bin", "python3", "3.13.1")
    run = _make(tmp_path, "install")
    assert run.returncode == 2
    assert "no Python 3.10, 3.11 or 3.12 found (python3 is Python 3.13.1)" in run.stderr
    assert "install python3.12" in run.stderr
    assert not (tmp_path / "venv").exists()


def test_the_flower_environment_takes_the_newest_python_from_3_11_to_3_13(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    _fake_python(tmp_path / "bin", "python3.13", "3.13.0")  # one that fails the check is passed over
    os.symlink(sys.executable, tmp_path / "bin" / f"python3.{sys.version_info.minor}")
    if sys.version_info < (3, 11):
        pytest.skip("the tests' Python is 3.10, which Flower does not take")
    run = _make(tmp_path, "-n", f"FLOWER_VENV={tmp_path / 'flower'}", "flower-install")
    assert run.returncode == 0, run.stderr
    assert f"python3.{sys.version_info.minor} -m venv {tmp_path / 'flower'}" in run.stdout
