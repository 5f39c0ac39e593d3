"""The project's Flower app as a FAB, built from the installed code, and its hash: what a site runs, by name.

The FAB holds a ``pyproject.toml`` (the app's name, version and components) and one module recording the
SHA-256 of every file of the installed ``patchsvdd`` package (``code_digest``). Flower builds a FAB
deterministically (fixed member dates and order), so the data scientist's build and each site's build of the
same code are the same bytes: ``app_hash`` is the identity a site compares a run's FAB with. A changed line
anywhere in the package gives another hash, and a site refuses that run (``site.py``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from flwr.cli.build import build_fab_from_files

import patchsvdd

PUBLISHER = "patchsvdd"
APP_NAME = "patchsvdd"
CODE_SUFFIXES = (".py", ".html")  # the package's code and the station page it serves
PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "{version}"
description = "Federated Patch SVDD: the app's name only; sites run their own installed code"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "{publisher}"

[tool.flwr.app.components]
serverapp = "patchsvdd.federated.flower.driver:server_app"
clientapp = "patchsvdd.federated.flower.site:client_app"

[tool.flwr.app.config]
code-sha256 = "{digest}"
"""


def package_folder() -> Path:
    """The folder of the installed ``patchsvdd`` package."""
    return Path(patchsvdd.__file__).resolve().parent


def code_digest(folder: Path | None = None) -> str:
    """SHA-256 over every code file of the package under ``folder`` (default: the installed one): each file's
    path relative to it and its bytes, in path order."""
    folder = package_folder() if folder is None else folder
    digest = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*") if p.suffix in CODE_SUFFIXES and "__pycache__" not in p.parts)
    for path in files:
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def app_files(digest: str | None = None) -> dict[str, bytes]:
    """The files of the app: its ``pyproject.toml`` and a module holding the code digest."""
    digest = code_digest() if digest is None else digest
    version = patchsvdd.__version__
    pyproject = PYPROJECT.format(name=APP_NAME, version=version, publisher=PUBLISHER, digest=digest)
    module = f'"""The patchsvdd app: its name only."""\n\nCODE_SHA256 = "{digest}"\nVERSION = "{version}"\n'
    return {"pyproject.toml": pyproject.encode(), "patchsvdd_app/__init__.py": module.encode()}


def build_app(digest: str | None = None) -> bytes:
    """The FAB of the app (bytes), as ``flwr build`` and ``flwr run`` make it from ``write_app``'s folder."""
    fab, _ = build_fab_from_files(app_files(digest))
    return fab


def app_hash(digest: str | None = None) -> str:
    """The SHA-256 (hex) of the app's FAB: what a SuperLink and a SuperNode call the run's FAB hash."""
    return hashlib.sha256(build_app(digest)).hexdigest()


def write_app(folder: Path) -> Path:
    """Write the app's files into ``folder`` (for ``flwr run FOLDER``); returns ``folder``."""
    for name, content in app_files().items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return folder
