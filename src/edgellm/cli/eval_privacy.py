"""`edgellm eval privacy`: how much of the device's text an edge server recovers from the smashed data (and the
training gradients) at each cut and DP noise level, next to what the noise costs and its epsilon."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# The library is imported inside `run`: building the parser for `edgellm --help` must stay light.

ATTACK_NAMES = ("nn", "learned", "optimize", "labels")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_privacy_parser(tasks: argparse._SubParsersAction) -> None:
    parser = tasks.add_parser(
        "privacy",
        help="attack the smashed data at each cut and noise level; utility cost and epsilon of each",
        description="An honest-but-curious edge server that knows the public base model tries to recover the "
        "device's tokens from what it receives at cut k. Attacks: nn (each row matched to the base model's "
        "cut-k output of every vocabulary token), learned (an MLP trained on the public model's states of the "
        "public text (--public-text; disjoint from the device's), noise-aware against noise), optimize (UnSplit-style search for the input whose "
        "cut-k output matches, on a split fine-tuning batch), labels (the answer tokens from the gradient the "
        "device returns in split fine-tuning). nn and learned attack the held-out text (--heldout). Per setting: "
        "token recovery and ROUGE-L F1 per attack, perplexity increase of the held-out text with the noise at the "
        "cut, and epsilon per row and per answer of --answer-rows rows. Noise 0 is no defence; noise z > 0 clips "
        "each row to --clip x the median row norm at its cut, then adds N(0, (z x bound)^2).",
    )
    parser.add_argument(
        "--model", default="smollm2-135m", help="registered name or model directory (default: %(default)s)"
    )
    parser.add_argument("--cuts", type=_ints, default=(1, 2, 4, 8), metavar="C1,C2,...",
                        help="cuts to attack (default: 1,2,4,8)")  # fmt: skip
    parser.add_argument("--noise", type=_floats, default=(0.0, 0.5, 1.0, 2.0), metavar="Z1,Z2,...",
                        help="noise multipliers; 0 = no defence (default: 0,0.5,1,2)")  # fmt: skip
    parser.add_argument("--clip", type=float, default=2.0, metavar="X",
                        help="row bound as a multiple of the median row norm at each cut (default: %(default)s)")  # fmt: skip
    parser.add_argument("--attacks", type=_names, default=ATTACK_NAMES, metavar="A1,A2,...",
                        help=f"a subset of {','.join(ATTACK_NAMES)} (default: all)")  # fmt: skip
    parser.add_argument("--tokens", type=int, default=512, metavar="N",
                        help="held-out tokens attacked and scored for perplexity (default: %(default)s)")  # fmt: skip
    parser.add_argument("--train-tokens", type=int, default=16000, metavar="N",
                        help="public-text tokens the learned attacker trains on (default: %(default)s)")  # fmt: skip
    parser.add_argument("--window", type=int, default=128, metavar="N",
                        help="tokens per sequence and perplexity window (default: %(default)s)")  # fmt: skip
    parser.add_argument("--answer-rows", type=int, default=16, metavar="N",
                        help="rows of a whole answer, for its epsilon (default: %(default)s)")  # fmt: skip
    parser.add_argument("--delta", type=float, default=1e-5, help="delta of every epsilon (default: %(default)s)")
    parser.add_argument("--task", default=None, metavar="NAME",
                        help="also fine-tune (split, with the noise) on this built-in task and report exact match; "
                        "slow: minutes per setting (default: off)")  # fmt: skip
    parser.add_argument(
        "--steps", type=int, default=30, metavar="N", help="fine-tuning steps with --task (default: 30)"
    )
    parser.add_argument("--task-n", type=int, default=50, metavar="N", help="eval examples with --task (default: 50)")
    parser.add_argument("--heldout", type=Path, default=None, metavar="FILE",
                        help="the device's text (default: the first 9 kB of the 1911 Britannica article on "
                        "Shakespeare, shipped)")  # fmt: skip
    parser.add_argument("--public-text", type=Path, action="append", default=None, metavar="FILE",
                        help="the attacker's text, repeatable; refused if it overlaps the device's (default: the "
                        "rest of that article, shipped: ~18,000 tokens)")  # fmt: skip
    parser.add_argument("--grad-clip", type=float, default=None, metavar="G",
                        help="training traffic: also clip each gradient row the device returns to L2 norm G and add "
                        "noise at each setting's multiplier (finetune's --dp-grad-noise: the labels' defence; "
                        "default: off)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="noise, training and data seed (default: 0)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--plot", type=Path, default=None, metavar="OUT.png",
                        help="draw recovery per cut and the privacy-utility curve (needs matplotlib)")  # fmt: skip
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from edgellm.eval.privacy_engine import PrivacyConfig, run_privacy

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    extra: dict = {"heldout_text": args.heldout} if args.heldout is not None else {}
    if args.public_text:
        extra["public_texts"] = tuple(args.public_text)
    config = PrivacyConfig(
        model=args.model, cuts=args.cuts, noise=args.noise, clip=args.clip, attacks=args.attacks,
        tokens=args.tokens, train_tokens=args.train_tokens, window=args.window, answer_rows=args.answer_rows,
        delta=args.delta, task=args.task, steps=args.steps, task_n=args.task_n, seed=args.seed,
        grad_clip=args.grad_clip, **extra,
    )  # fmt: skip
    report = run_privacy(config)
    if args.plot is not None:
        from edgellm.eval.privacy_plot import plot_report

        plot_report(report, args.plot)
    if args.json:
        print(json.dumps(report))
        return 0
    print(format_report(report))
    return 0


def format_report(report: dict) -> str:
    """The report as a table: one line per (cut, noise)."""
    attacks = [a for a in report["attacks"]]
    head = "cut  noise  " + "  ".join(f"{a:>9}" for a in attacks) + "   ppl +%   eps/row  eps/answer"
    lines = [f"{report['model']}: token recovery per attack (frequency baseline {report['baseline_recovery']:.1%}), "
             f"base ppl {report['baseline_ppl']:.2f}", head]  # fmt: skip
    for row in report["rows"]:
        cells = "  ".join(
            f"{row['attacks'][a]['recovery']:>9.1%}" if a in row["attacks"] else f"{'-':>9}" for a in attacks
        )
        eps = [f"{e:>9.3g}" if e is not None else f"{'inf':>9}" for e in (row["epsilon_row"], row["epsilon_answer"])]
        task = f"  EM {row['task']['exact_match']:.0%}" if "task" in row else ""
        lines.append(
            f"{row['cut']:>3}  {row['noise']:>5g}  {cells}  {row['ppl_increase_pct']:>8.1f}  {eps[0]}  {eps[1]}{task}"
        )
    return "\n".join(lines)
