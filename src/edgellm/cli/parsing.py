"""The argument parser every command shares: flags common to all commands, and "did you mean" on a typo."""

from __future__ import annotations

import argparse
import difflib
import re
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

_INVALID_CHOICE = re.compile(r"invalid choice: '(?P<given>[^']*)' \(choose from (?P<choices>.*)\)")


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors suggest the closest valid command, choice or option."""

    def error(self, message: str) -> NoReturn:
        match = _INVALID_CHOICE.search(message)
        if match:
            choices = re.findall(r"'([^']*)'", match["choices"])
            close = closest(match["given"], choices)
            if close is not None:
                message += f"; did you mean {close!r}?"
        super().error(message)


def closest(given: str, candidates: Sequence[str]) -> str | None:
    """The candidate closest to a mistyped `given`, or None when none is close enough to suggest."""
    close = difflib.get_close_matches(given, list(candidates), n=1, cutoff=0.6)
    return close[0] if close else None


def add_common_flags(parser: argparse.ArgumentParser, top: bool) -> None:
    """-v, -q and --debug, on the top parser and again on every subcommand (`edgellm generate -q ...`).

    On a subcommand the defaults are suppressed, so a flag given before the command is not reset after it.
    """
    default: Any = False if top else argparse.SUPPRESS
    parser.add_argument("-v", "--verbose", action="store_true", default=default, help="log progress details to stderr")
    parser.add_argument("-q", "--quiet", action="store_true", default=default,
                        help="print only the answer or result: no progress lines or bars, no stats tables")  # fmt: skip
    parser.add_argument("--debug", action="store_true", default=default, help="show full tracebacks on errors")


def subcommand_parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """Every parser below `parser` (subcommands, and their own subcommands), depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases map to the same parser once
                yield sub
                yield from subcommand_parsers(sub)


def chosen_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The innermost subcommand parser that `args` came from (`edgellm models list` -> the `list` parser)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            name = getattr(args, action.dest, None)
            if name in action.choices:
                return chosen_parser(action.choices[name], args)
    return parser


def reject_unknown(parser: argparse.ArgumentParser, args: argparse.Namespace, extras: list[str]) -> None:
    """Exit 2 naming arguments the command does not know, with the closest option for each mistyped flag.

    A mistyped option's value may have been taken as the prompt: nothing runs, so it cannot be used as one.
    """
    if not extras:
        return
    command = chosen_parser(parser, args)
    options = [s for action in command._actions for s in action.option_strings if s.startswith("--")]
    parts = []
    for extra in extras:
        flag = extra.split("=", 1)[0]
        close = closest(flag, options) if flag.startswith("-") else None
        parts.append(repr(extra) if close is None else f"{extra!r} (did you mean {close}?)")
    noun = "argument" if len(extras) == 1 else "arguments"
    command.error(f"unrecognized {noun}: {', '.join(parts)}; see `{command.prog} --help`")
