"""`edgellm draft train-exit`: distill an early-exit head for self-speculative drafting."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from edgellm.cli.choices import ENGINES
from edgellm.store import DEFAULT_MODEL

# The library (torch) is imported inside `run_train_exit`, not here: building the parser for `edgellm --help` must
# stay light (tests/test_cli_light.py). The defaults below mirror edgellm.spec (tests/test_exit_head.py checks).
DEFAULT_LAYER = 15  # edgellm.spec.exit_recipe.DEFAULT_LAYER
DEFAULT_RANK = 128  # edgellm.spec.exit_recipe.DEFAULT_RANK
DEFAULT_STEPS = 150  # edgellm.spec.distill.DistillConfig().steps
DEFAULT_LR = 3e-3  # edgellm.spec.distill.DistillConfig().lr
DEFAULT_CHAT_PROMPTS = 96  # edgellm.spec.exit_recipe.ExitDataConfig().chat_prompts


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "draft", help="train drafters for speculative decoding", description="Train drafters for speculative decoding."
    )
    sub = parser.add_subparsers(dest="draft_command", metavar="ACTION", required=True)
    p = sub.add_parser(
        "train-exit",
        help="distill an early-exit head: the model's first layers as a drafter",
        description="Train a small adapter on the hidden state after layer --layer so that the model's first "
        "layers, with the model's own final norm and LM head, predict the full model's next token: a "
        "self-speculative drafter for the device. The full model teaches it (KL to its distribution) on the "
        "shipped public-domain text and on its own greedy answers to chat requests made from it; the text's last "
        "fifth is held out. Prints the agreement with the full model (top-1) before and after training.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="registered name, model directory or .gguf file (default: %(default)s)")  # fmt: skip
    p.add_argument("--layer", type=int, default=DEFAULT_LAYER, metavar="C",
                   help="exit after layers [0, C) (default: %(default)s)")  # fmt: skip
    p.add_argument("--rank", type=int, default=DEFAULT_RANK, metavar="R", help="adapter rank (default: %(default)s)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, metavar="N",
                   help="gradient steps after the closed-form start (default: %(default)s)")  # fmt: skip
    p.add_argument("--lr", type=float, default=DEFAULT_LR, help="peak learning rate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts' order and the batches (default: 0)")
    p.add_argument("--text", type=Path, action="append", default=[], metavar="FILE",
                   help="also learn from this UTF-8 text file (repeatable); its last fifth is held out")  # fmt: skip
    p.add_argument("--chat-prompts", type=int, default=DEFAULT_CHAT_PROMPTS, metavar="N",
                   help="chat requests the model answers to learn from (default: %(default)s)")  # fmt: skip
    p.add_argument("--out", type=Path, default=None, metavar="FILE",
                   help="where to save it (default: <home>/drafts/<model>-exit<C>-r<R>.safetensors)")  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--engine", choices=ENGINES, default="fast", help="what runs the decoder blocks (default: fast)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run_train_exit)


def run_train_exit(args: argparse.Namespace) -> int:
    from edgellm.spec.distill import DistillConfig
    from edgellm.spec.exit_recipe import ExitDataConfig, ExitRecipe, train_exit_head

    recipe = ExitRecipe(
        model=args.model,
        layer=args.layer,
        rank=args.rank,
        distill=DistillConfig(steps=args.steps, lr=args.lr, seed=args.seed),
        data=ExitDataConfig(chat_prompts=args.chat_prompts, texts=tuple(args.text)),
        out=args.out,
        threads=args.threads,
        engine=args.engine,
    )
    report = train_exit_head(recipe)  # progress (a bar on a terminal, lines otherwise) goes to stderr
    if args.json:
        print(json.dumps(report))
        return 0
    print(summary(report))
    return 0


def summary(report: dict[str, Any]) -> str:
    """The report in two lines: agreement before -> after, and where the head went."""
    before, after, seconds = report["before"], report["after"], report["seconds"]

    def moved(name: str, key: str, fmt: str) -> str:
        return f"{before[name][key]:{fmt}} -> {after[name][key]:{fmt}}"

    return (
        f"exit@{report['layer']} (rank {report['rank']}) of {report['model']}: agreement with the full model "
        f"{moved('text', 'agreement', '.1%')} on held-out text ({before['text']['tokens']} tokens), "
        f"{moved('chat', 'agreement', '.1%')} on its own chat answers ({before['chat']['tokens']} tokens); "
        f"KL {moved('text', 'kl', '.2f')} nats; {report['settings']['steps']} steps in {seconds['train']:.0f} s "
        f"({seconds['total']:.0f} s in all)\nsaved: {report['out']}"
    )
