"""Command line: patchsvdd synth | train | evaluate | export | predict | serve | bundle | import-weights | certs.

This module only parses: the commands and their tables of options live in ``make_commands`` (synth,
train, import-weights, certs) and ``inspect_commands`` (evaluate, export, predict, serve, bundle);
``options`` turns a table into a subparser. Heavy imports happen inside each command so that
``patchsvdd --help`` is quick and bad arguments fail before any work. A user's mistake (an
``InputError``: bad file, folder or setting) is printed as one line with exit
code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from patchsvdd.cli.options import DefaultsHelp, add_command, at_least, bank_fraction
from patchsvdd.errors import InputError

__all__ = ["DefaultsHelp", "at_least", "bank_fraction", "build_parser", "main"]
ORDER = ("synth", "train", "evaluate", "export", "predict", "serve", "bundle", "import-weights", "certs")


def build_parser() -> argparse.ArgumentParser:
    """``patchsvdd`` and its subcommands, from the command tables of ``make_commands`` and ``inspect_commands``."""
    from patchsvdd.cli import inspect_commands, make_commands

    parser = argparse.ArgumentParser(
        prog="patchsvdd", description="Federated Patch SVDD: anomaly detection and localisation on MVTec-layout images."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    table = {command.name: command for command in (*make_commands.commands(), *inspect_commands.commands())}
    for name in ORDER:
        add_command(sub, table.pop(name))
    for command in table.values():  # a command added to a table but not to ORDER still appears, last
        add_command(sub, command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except InputError as exc:  # a bad file, folder or setting: one line, no traceback
        print(f"patchsvdd {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
