"""`edgellm eval ppl`: perplexity of the (cut, quantized, codec-compressed) model over a text file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edgellm.cli.generate import add_model_arguments
from edgellm.eval.ppl import PplConfig
from edgellm.eval.run import EvalConfig, run_ppl
from edgellm.model.stage import parse_cuts
from edgellm.net.codec import CODECS
from edgellm.quant.scheme import parse_quant


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="measure the model's accuracy", description="Measure accuracy.")
    tasks = parser.add_subparsers(dest="task", metavar="TASK", required=True)
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


def run(args: argparse.Namespace) -> int:
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
