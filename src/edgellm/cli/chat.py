"""`edgellm chat`: (being written)."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("chat", help="(being written)")
    parser.set_defaults(run=lambda args: 0)
