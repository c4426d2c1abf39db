"""`edgellm eval ppl`: perplexity of the (cut, quantized, codec-compressed) model over a text file;
`edgellm eval task`: exact match and response loss on a built-in fine-tuning task;
`edgellm eval privacy` (cli/eval_privacy.py): attacks on the smashed data, against cut and DP noise."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edgellm.cli.choices import CODECS
from edgellm.cli.eval_privacy import add_privacy_parser
from edgellm.cli.generate import add_model_arguments
from edgellm.train.tasks import DEFAULT_TASK, TASKS

# The library (torch, transformers) is imported inside the functions that run a command, not here: building the
# parser for `edgellm --help` must stay light (tests/test_cli_light.py).


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="measure the model's accuracy", description="Measure accuracy.")
    tasks = parser.add_subparsers(dest="metric", metavar="METRIC", required=True)
    ppl = tasks.add_parser(
        "ppl",
        help="perplexity over a text file, with a sliding window",
        description="Perplexity of the model over a text file: windows of --ctx tokens every --stride tokens, "
        "each token scored once. --quant quantizes the weights of every stage; --act-codec compresses the "
        "hidden states at every cut, as on the wire.",
    )
    ppl.add_argument("--text", type=Path, required=True, metavar="FILE", help="UTF-8 text file to score")
    add_model_arguments(ppl)
    ppl.add_argument(
        "--act-codec",
        default="none",
        metavar="CODEC",
        help=f"smashed-data codec at every cut: one of {list(CODECS)}, optionally +zstd/+lz4 (default: none)",
    )
    ppl.add_argument("--ctx", type=int, default=512, help="tokens per window (default: 512)")
    ppl.add_argument("--stride", type=int, default=None, metavar="N", help="tokens between windows (default: ctx)")
    ppl.add_argument("--max-tokens", type=int, default=None, metavar="N", help="score only the first N tokens")
    ppl.add_argument("--no-cache", action="store_true", help="do not keep quantized stages on disk")
    ppl.add_argument("--json", action="store_true", help="print one JSON object")
    ppl.set_defaults(run=run)
    add_task_parser(tasks)
    add_privacy_parser(tasks)


def add_task_parser(tasks: argparse._SubParsersAction) -> None:
    task = tasks.add_parser(
        "task",
        help="exact match and response loss on a built-in fine-tuning task",
        description="Greedy-decode the eval split of a built-in task and report exact match, and the mean "
        "teacher-forced loss on the responses (as in training). Exact match ignores surrounding whitespace; on the "
        "real tasks (antonyms, plays) also case, quotes and closing punctuation. --adapter applies a peft-format "
        "LoRA adapter. "
        f"Tasks: {'; '.join(f'{t.name}: {t.description}' for t in TASKS.values())}.",
    )
    task.add_argument("--task", default=DEFAULT_TASK, choices=sorted(TASKS), help="the task (default: %(default)s)")
    task.add_argument("--n", type=int, default=100, help="eval examples (default: 100)")
    task.add_argument("--seed", type=int, default=0, help="seed the examples are drawn with (default: 0)")
    task.add_argument("--adapter", type=Path, default=None, metavar="DIR", help="peft-format LoRA adapter directory")
    task.add_argument("--batch-size", type=int, default=16, metavar="N", help="examples per batch (default: 16)")
    task.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="longest answer (default: 32)")
    add_model_arguments(task)
    task.add_argument("--json", action="store_true", help="print one JSON object")
    task.set_defaults(run=run_task_command)


def run(args: argparse.Namespace) -> int:
    from edgellm.eval.ppl import PplConfig
    from edgellm.eval.ppl_engine import EvalConfig, run_ppl
    from edgellm.model.stage import parse_cuts
    from edgellm.quant.scheme import parse_quant

    config = EvalConfig(
        model=args.model,
        text=args.text,
        window=PplConfig(ctx=args.ctx, stride=args.stride, max_tokens=args.max_tokens),
        cuts=parse_cuts(args.cuts),
        head=args.head,
        quant=parse_quant(args.quant),
        act_codec=args.act_codec,
        dtype=args.dtype,
        threads=args.threads,
        cache=not args.no_cache,
        engine=args.engine,
    )
    report = run_ppl(config)
    if args.json:
        print(json.dumps(report))
        return 0
    print(
        f"{report['model']} quant={report['quant']} act-codec={report['act_codec']} cuts={report['cuts'] or 'none'}: "
        f"ppl {report['ppl']:.3f} over {report['tokens']} tokens ({report['windows']} windows of {report['ctx']}, "
        f"stride {report['stride']}), weights {report['weight_bytes'] / 1e6:.1f} MB, {report['eval_s']:.1f} s"
    )
    return 0


def run_task_command(args: argparse.Namespace) -> int:
    from edgellm.eval.task import TaskEvalConfig, run_task
    from edgellm.model.stage import parse_cuts
    from edgellm.serve.local_engine import LocalSplitConfig

    config = TaskEvalConfig(
        model=LocalSplitConfig(
            args.model, parse_cuts(args.cuts), args.head, args.dtype, args.threads, args.quant, args.engine
        ),
        task=args.task,
        n=args.n,
        seed=args.seed,
        adapter=args.adapter,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
    )
    report = run_task(config)  # progress (a bar on a terminal, lines otherwise) goes to stderr
    if args.json:
        print(json.dumps(report))
        return 0
    adapter = f" adapter={report['adapter']}" if report["adapter"] else ""
    print(
        f"{report['model']}{adapter} task={report['task']}: exact match {report['exact_match']:.1%} "
        f"({report['correct']}/{report['n']}), eval loss {report['eval_loss']:.4f} over {report['label_tokens']} "
        f"response tokens, {report['eval_s']:.1f} s"
    )
    return 0
