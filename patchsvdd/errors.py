"""The one base class of every error a user can cause (standard library only).

A bad file, folder or setting raises a subclass of ``InputError`` whose
message names it and says what is wrong; the command line prints those as
one line and exit code 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class InputError(ValueError):
    """Bad input from a user (a file, a folder, a setting); the message names it and what is wrong."""


class SettingsError(InputError):
    """A setting out of range; the message names it and what it may be."""


class MVTecDataError(InputError):
    """Bad MVTec input (a folder of the layout, an image or mask file). The message names the path and what is wrong."""


def exit_code(call: Callable[[], object], errors: type[Exception] | tuple[type[Exception], ...], prefix: str) -> int:
    """Run ``call``: 0, or 2 after one line '<prefix><error>' on stderr when it raises one of ``errors``
    (what a module's small ``main`` answers a script that checks something before starting a node)."""
    try:
        call()
    except errors as exc:
        print(f"{prefix}{exc}", file=sys.stderr)
        return 2
    return 0
