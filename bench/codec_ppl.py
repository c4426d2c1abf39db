"""What quantized smashed data costs in perplexity: the codec at every cut, with float and 4-bit weights.

Every row is `edgellm eval ppl` (the same engine, in this process) over the texts of `bench/quant.py`, the model
cut at layers 10 and 20 with the head on the device, the codec applied at all three cuts. Perplexity is
deterministic (the same tokens, the same arithmetic), so each row is evaluated once: there is no run-to-run
spread to put an interval on; the record (commit, machine, load) is that of every benchmark here.

    .venv/bin/python bench/quant.py --fetch-texts bench/texts      # once: the two texts
    .venv/bin/python bench/codec_ppl.py --texts bench/texts --json bench/results/codec-ppl.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from record import Recorder, add_record_arguments, machine_info

WEIGHTS = ["none", "int4-g32,head=int8,embed=int8"]
CODECS = ["none", "fp16", "bf16", "int8", "int8mu"]
TEXTS = ["britannica.txt", "python-tutorial.txt"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=Path, default=Path("bench/texts"), help="folder of the two texts")
    parser.add_argument("--weights", default=";".join(WEIGHTS), help="weight schemes, ';'-separated")
    parser.add_argument("--codecs", default=",".join(CODECS), help="smashed-data codecs, comma-separated")
    parser.add_argument("--cuts", default="10,20", help="cut points (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=4097, help="tokens of each text (default: %(default)s)")
    parser.add_argument("--ctx", type=int, default=512, help="context window (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    add_record_arguments(parser, repeats=1, rows="row (perplexity is deterministic: 1)")
    return parser.parse_args(argv)


def evaluate(args: argparse.Namespace, weights: str, codec: str, text: Path) -> dict[str, Any]:
    from edgellm.eval.ppl import PplConfig
    from edgellm.eval.ppl_engine import EvalConfig, run_ppl
    from edgellm.quant.scheme import parse_quant

    config = EvalConfig(
        model="smollm2-135m",
        text=text,
        window=PplConfig(ctx=args.ctx, max_tokens=args.max_tokens),
        cuts=tuple(int(c) for c in args.cuts.split(",")),
        head="device",
        quant=parse_quant(weights),
        act_codec=codec,
        threads=args.threads,
    )
    return run_ppl(config)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    recorder = Recorder("codec-ppl", args.json, args.allow_dirty)
    texts = [args.texts / name for name in TEXTS]
    missing = [str(t) for t in texts if not t.exists()]
    if missing:
        print(f"missing texts {missing}: run bench/quant.py --fetch-texts {args.texts}", file=sys.stderr)
        return 2
    rows = []
    for weights in args.weights.split(";"):
        for codec in args.codecs.split(","):
            row: dict[str, Any] = {"weights": weights, "act_codec": codec, "ppl": {}}
            for text in texts:
                start = time.perf_counter()
                report = evaluate(args, weights, codec, text)
                row["ppl"][text.stem] = report["ppl"]
                row["tokens_scored"] = report["tokens"]
                print(f"[codec-ppl] {weights} / {codec} / {text.stem}: ppl {report['ppl']} "
                      f"({time.perf_counter() - start:.0f} s)", file=sys.stderr)  # fmt: skip
            rows.append(row)
    for row in rows:  # relative to the same weights with codec none
        ref = next(r for r in rows if r["weights"] == row["weights"] and r["act_codec"] == "none")
        row["delta_pct"] = {k: round(100 * (v / ref["ppl"][k] - 1), 3) for k, v in row["ppl"].items()}
    print("\n| weights | act codec | " + " | ".join(f"ppl {t.stem}" for t in texts) + " |")
    print("|---|---|" + "---:|" * len(texts))
    for row in rows:
        cells = [f"{row['ppl'][t.stem]:.3f} ({row['delta_pct'][t.stem]:+.2f}%)" for t in texts]
        print(f"| {row['weights']} | {row['act_codec']} | " + " | ".join(cells) + " |")
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "allow_dirty")}
    recorder.write({"settings": {**settings, "texts": str(args.texts)}, "rows": rows}, machine_info(args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
