"""Versions of a site bundle: every change is a new folder, made in full before one atomic switch.

A bundle as ``export`` writes it is version 1, its files in the bundle folder
itself. A change (operator feedback, ``patchsvdd bundle add-good``) writes the
whole new version into ``versions/.staging-*``, flushes it to disk, renames it
to ``versions/NNNN`` and only then replaces the one-line file ``CURRENT`` that
names it (``os.replace``, atomic on POSIX). A crash at any point leaves
``CURRENT`` naming a complete version; a left-over staging folder is ignored
and cleared by the next change. Files a version shares with the one before
(the model, a bank that did not change) are hard links where the file system
allows. ``bundle.json`` of each version records its number, what changed, when,
by which request, and the SHA-256 of the version before (``digest``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from patchsvdd.errors import InputError

CURRENT_FILE = "CURRENT"
VERSIONS_DIR = "versions"
INFO_FILE = "bundle.json"
STAGING_PREFIX = ".staging-"


class VersionError(InputError):
    """A bundle's versions cannot be read or changed as asked; the message names the file."""


def current_folder(bundle: str | os.PathLike) -> Path:
    """The folder that holds the bundle's current version: ``versions/NNNN`` named by ``CURRENT``, else the
    bundle folder itself (a bundle never changed since export)."""
    bundle = Path(bundle)
    pointer = bundle / CURRENT_FILE
    if not pointer.is_file():
        return bundle
    name = pointer.read_text().strip()
    folder = bundle / name
    if not name.startswith(f"{VERSIONS_DIR}/") or ".." in name or not (folder / INFO_FILE).is_file():
        raise VersionError(f"{pointer}: names {name!r}, which is not a complete version of this bundle")
    return folder


def digest(folder: str | os.PathLike) -> str:
    """SHA-256 of one version: of each file's name and SHA-256, in name order (sub-folders included)."""
    folder = Path(folder)
    total = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        if relative.startswith((VERSIONS_DIR + "/", CURRENT_FILE)):
            continue  # version 1 lives in the bundle folder beside the others
        one = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                one.update(chunk)
        total.update(f"{relative}\0{one.hexdigest()}\n".encode())
    return total.hexdigest()


def _version_files(folder: Path) -> list[Path]:
    """The files of the version in ``folder`` (not the other versions, when it is the bundle folder)."""
    return [
        p
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.relative_to(folder).as_posix().startswith((VERSIONS_DIR + "/", CURRENT_FILE))
    ]


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _fsync_tree(folder: Path) -> None:
    for path in [*folder.rglob("*"), folder]:
        flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
        descriptor = os.open(path, flags)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def version_number(info: dict[str, Any]) -> int:
    """The version a ``bundle.json`` describes (1 for one written by export)."""
    return int(info.get("bundle_version", 1))


def write_version(
    bundle: str | os.PathLike,
    change: dict[str, Any],
    write: Callable[[Path, dict[str, Any]], None],
) -> Path:
    """Make the next version of ``bundle`` and switch to it atomically; returns its folder.

    ``write(staging, info)`` gets a folder holding links to every file of the current version and that
    version's ``bundle.json`` as a dict; it replaces what changes (a file it rewrites must be removed or
    replaced, never written in place: it may be a link to the previous version's file) and edits ``info``.
    ``change`` (what was added, by which request) goes into the new version's ``bundle.json`` history.
    """
    bundle = Path(bundle)
    previous = current_folder(bundle)
    info = json.loads((previous / INFO_FILE).read_text())
    versions = bundle / VERSIONS_DIR
    versions.mkdir(exist_ok=True)
    kept = [int(p.name) for p in versions.iterdir() if p.name.isdigit()]
    number = max([version_number(info), *kept]) + 1  # after a rollback, the versions rolled back stay
    for stale in versions.glob(STAGING_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)  # a change that crashed before its switch
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=versions))
    try:
        for path in _version_files(previous):
            _link_or_copy(path, staging / path.relative_to(previous))
        (staging / INFO_FILE).unlink()
        write(staging, info)
        entry = {"version": number, "previous_version": version_number(info), "previous_sha256": digest(previous)}
        info["history"] = [*info.get("history", []), {**entry, **change}]
        info["bundle_version"] = number
        (staging / INFO_FILE).write_text(json.dumps(info, indent=2))
        _fsync_tree(staging)
        final = versions / f"{number:04d}"
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _switch(bundle, final)
    return final


def _switch(bundle: Path, folder: Path) -> None:
    """Point ``CURRENT`` at ``folder`` atomically (a new file renamed over the old one)."""
    pointer = bundle / CURRENT_FILE
    temporary = bundle / f"{CURRENT_FILE}.new"
    with open(temporary, "w") as handle:
        handle.write(folder.relative_to(bundle).as_posix() + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, pointer)
    descriptor = os.open(bundle, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def rollback(bundle: str | os.PathLike) -> tuple[int, int]:
    """Make the version before the current one current again; returns (from, to) version numbers.

    The rolled-back version stays on disk (``versions/NNNN``); the next change is numbered after it."""
    bundle = Path(bundle)
    folder = current_folder(bundle)
    info = json.loads((folder / INFO_FILE).read_text())
    number = version_number(info)
    if number == 1 or not info.get("history"):
        raise VersionError(f"{folder / INFO_FILE}: version {number} has no previous version to return to")
    before = int(info["history"][-1]["previous_version"])
    target = bundle if before == 1 else bundle / VERSIONS_DIR / f"{before:04d}"
    if not (target / INFO_FILE).is_file():
        raise VersionError(f"{target / INFO_FILE}: version {before} is missing, cannot roll back to it")
    expected = info["history"][-1].get("previous_sha256")
    if expected and digest(target) != expected:
        raise VersionError(f"{target}: version {before} no longer has the SHA-256 recorded in {folder / INFO_FILE}")
    if before == 1:
        (bundle / CURRENT_FILE).unlink()
    else:
        _switch(bundle, target)
    return number, before


def history(bundle: str | os.PathLike) -> list[dict[str, Any]]:
    """The current version's history: one entry per change since export, oldest first."""
    info = json.loads((current_folder(bundle) / INFO_FILE).read_text())
    return list(info.get("history", []))
