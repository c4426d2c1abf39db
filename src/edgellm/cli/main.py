"""`edgellm`: one console script, one module per subcommand."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Sequence

from edgellm import __version__
from edgellm.cli import (
    cache,
    calc,
    chat,
    check,
    demo,
    draft,
    eval,
    finetune,
    generate,
    models,
    node,
    plan,
    profile,
    run,
    serve,
)
from edgellm.cli.parsing import Parser, add_common_flags, reject_unknown, subcommand_parsers
from edgellm.errors import EdgellmError
from edgellm.progress import set_quiet

SUBCOMMANDS = [demo, generate, chat, run, serve, check, node, profile, plan, finetune, models, cache, eval, draft, calc]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="edgellm",
        description="Split inference and training of language models across a device and edge servers.",
    )
    parser.add_argument("--version", action="version", version=f"edgellm {__version__}")
    add_common_flags(parser, top=True)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(subparsers)
    for sub in subcommand_parsers(parser):
        add_common_flags(sub, top=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code, which says whose fault a failure is (`edgellm.errors`).

    0 ok; 1 internal error (a bug: its traceback is printed); 2 bad input (arguments, files, topology);
    3 a peer or the network failed (retry); 4 a node is busy (back off and retry); 130 interrupted.
    An expected error prints one line, `edgellm: error: ...`; --debug (or EDGELLM_DEBUG=1) prints its traceback
    too, and the exit code stays the same.
    """
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    reject_unknown(parser, args, extras)  # exits 2: a typo never runs a command, nor becomes its prompt
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    set_quiet(args.quiet)  # progress bars and phase lines (edgellm.progress)
    if not args.verbose:
        # progress of long steps (pull, convert, load) shows by default; --quiet keeps only warnings
        logging.getLogger("edgellm").setLevel(logging.WARNING if args.quiet else logging.INFO)
        _quiet_third_party()
    debug = args.debug or os.environ.get("EDGELLM_DEBUG") == "1"
    try:
        return int(args.run(args) or 0)
    except EdgellmError as exc:
        if debug:
            traceback.print_exc()
        detail = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())  # always one line
        print(f"edgellm: error: {detail}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        print("edgellm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except Exception as exc:  # noqa: BLE001 - a bug: the traceback, as an uncaught exception would print it
        if debug:
            raise
        sys.excepthook(type(exc), exc, exc.__traceback__)
        print(f"edgellm: internal error (a bug; please report it with the traceback above): {exc!r}", file=sys.stderr)
        return 1


def _quiet_third_party() -> None:
    # transformers reads these when it is imported; importing it here would cost every command a second.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # a subcommand module imported it already: tell it directly
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
