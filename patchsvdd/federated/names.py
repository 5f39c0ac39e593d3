"""Names a client sends that a site or the director turns into folder names or keys, checked before any use.

One pattern for every such name (an experiment's, a bundle's, a collaborator's, a defect type's): a letter or
digit, then up to 99 letters, digits, '.', '_' or '-', with no '..'. So a name is one path component that
can neither climb (``..``), nor start at the root (``/``), nor hide a control character, a separator or a
NUL. ``child`` adds the second half: the path it gives lies inside the folder meant for it, also where a
link already sits at that name. Standard library only.
"""

from __future__ import annotations

import re
from pathlib import Path

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
SHOWN = 40  # characters of a refused name a sentence repeats


class ExperimentRefused(Exception):
    """An experiment this site or director does not run; ``str()`` says what was refused and why."""


def shown(value: object, limit: int = SHOWN) -> str:
    """``value`` as a refusal sentence may repeat it: its repr, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"


def check_name(value: object, what: str) -> str:
    """``value`` if it is a name of the one pattern (see the module's docstring); else ExperimentRefused saying
    which ``what`` (e.g. "its experiment name") is not one."""
    if not isinstance(value, str) or NAME.fullmatch(value) is None or ".." in value:
        raise ExperimentRefused(
            f"{what} {shown(value)} is not a plain name (1 to 100 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, no '..')"
        )
    return value


def child(folder: str | Path, name: object, what: str) -> Path:
    """``folder/name`` for a checked ``name``, refused unless it resolves inside ``folder`` (a link at that name
    pointing elsewhere is refused too)."""
    base = Path(folder).resolve()
    path = base / check_name(name, what)
    if path.is_symlink() or path.resolve().parent != base:
        raise ExperimentRefused(f"{what} {shown(name)} leads outside {base}")
    return path
