"""The command line as data: a command is a table of its options (``Command``, ``opt``, ``Exclusive``), which
``add_command`` turns into an argparse subparser; the argument types and the help formatter they share."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class DefaultsHelp(argparse.HelpFormatter):
    """Help that shows each option's default where it has one (not for required or recipe-chosen ones)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        hidden = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if not hidden and "default" not in text:
            text += " (default: %(default)s)"
        return text


def at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number not below ``low`` (nor above ``high`` when given)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value}: must be at least {low}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{value}: must be at most {high}")
        return value

    return parse


def bank_fraction(text: str) -> float | str:
    """--bank-fraction: 'auto' or a share in (0, 1]."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: 'auto' or a number in (0, 1]") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text}: the share must be in (0, 1]")
    return value


@dataclass(frozen=True)
class Option:
    """One ``add_argument`` call: its flags (or positional name) and keywords."""

    flags: tuple[str, ...]
    keywords: dict[str, Any]


def opt(*flags: str, **keywords: Any) -> Option:
    return Option(flags, keywords)


@dataclass(frozen=True)
class Exclusive:
    """Options of which exactly one (``required``) or at most one may be given."""

    options: tuple[Option, ...]
    required: bool = False


@dataclass(frozen=True)
class Command:
    """A subcommand: its name, one line of help, its options, the function that runs it (``run(args) -> exit
    code``; None for a group), and its own subcommands (``dest`` names the chosen one)."""

    name: str
    help: str
    options: tuple[Option | Exclusive, ...] = ()
    run: Callable[[argparse.Namespace], int] | None = None
    subcommands: tuple[Command, ...] = ()
    dest: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)


DEVICE = opt("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
BUNDLE = opt("bundle", type=Path, help="bundle folder written by 'patchsvdd export'")
DATA = (
    opt("--data-root", required=True, type=Path, help="folder holding <category>/ in the MVTec AD layout"),
    opt("--category", required=True, help="category folder name, e.g. bottle (evaluate: or 'all')"),
    opt("--rank-worldsize", default="1,1", help="use only shard RANK of WORLD_SIZE, e.g. 1,2 (default: all data)"),
    DEVICE,
    opt("--no-progress", action="store_true", help="no progress bars"),
)


def add_options(parser: argparse.ArgumentParser, options: Sequence[Option | Exclusive]) -> None:
    """Add each option of the table ``options`` to ``parser`` (an ``Exclusive`` as a mutually exclusive group)."""
    for item in options:
        if isinstance(item, Exclusive):
            group = parser.add_mutually_exclusive_group(required=item.required)
            for option in item.options:
                group.add_argument(*option.flags, **option.keywords)
        else:
            parser.add_argument(*item.flags, **item.keywords)


def add_command(subparsers: Any, command: Command) -> argparse.ArgumentParser:
    """Add ``command`` (and its subcommands) to ``subparsers``; the parsed namespace carries its ``run``."""
    parser = subparsers.add_parser(command.name, formatter_class=DefaultsHelp, help=command.help)
    add_options(parser, command.options)
    if command.subcommands:
        nested = parser.add_subparsers(dest=command.dest, required=True)
        for subcommand in command.subcommands:
            add_command(nested, subcommand)
    parser.set_defaults(**command.defaults, **({"run": command.run} if command.run is not None else {}))
    return parser
