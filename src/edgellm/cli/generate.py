"""`edgellm generate`: split generation with every stage in this process (in-process transport)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import TYPE_CHECKING

from edgellm.cli.choices import DTYPE_NAMES, ENGINES, HEAD_PLACEMENTS, NO_QUANT, QUANT_PARTS, QUANT_SCHEMES
from edgellm.cli.dp_options import add_dp_arguments, dp_config, privacy_line
from edgellm.errors import ConfigError
from edgellm.store import DEFAULT_MODEL

if TYPE_CHECKING:
    from edgellm.model.sampling import SamplingConfig
    from edgellm.spec.config import SpeculativeConfig

# The library (torch, transformers) is imported inside the functions that run a command, not here: building the
# parser for `edgellm --help` must stay light (tests/test_cli_light.py).


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate text with the model cut into stages, all in this process",
        description="Generate text with the model cut into stages at --cuts, all stages in this process. "
        "The LM head runs on the device and the prompt is wrapped in the model's chat template unless --head server "
        "or --no-chat. Decoding is greedy unless --temperature, --top-k or --top-p is given.",
    )
    parser.add_argument("prompt", metavar="PROMPT", nargs="?", default=None,
                        help="the prompt text; '-' or none (with stdin not a terminal) reads it from stdin")  # fmt: skip
    add_model_arguments(parser)
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="stop after N tokens (default: 64)")
    add_sampling_arguments(parser)
    add_speculative_arguments(parser)
    add_chat_arguments(parser)
    add_dp_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    parser.set_defaults(run=run)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="registered name, Hugging Face model directory, or .gguf file (default: %(default)s)",
    )
    parser.add_argument(
        "--cuts",
        nargs="?",
        const="",
        default="",
        metavar="C1,C2,...",
        help="cut before these layer indices, e.g. 10,20 (1..L-1, increasing); empty or omitted: no split",
    )
    parser.add_argument(
        "--head",
        choices=HEAD_PLACEMENTS,
        default="device",
        help="where the final norm + LM head run: the device (U-shaped: the output distribution stays on it), or "
        "the last server stage (default: %(default)s)",
    )
    parser.add_argument("--dtype", choices=list(DTYPE_NAMES), default="fp32", help="weight precision (default: fp32)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--engine", choices=ENGINES, default="fast",
                        help="what runs the decoder blocks: fast (Llama, Mistral, Qwen2, Qwen3, Gemma 3, Phi-3; others "
                        "fall back to generic) or generic (transformers' block modules, the reference) (default: %(default)s)")  # fmt: skip
    add_quant_arguments(parser)


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("decoding")
    group.add_argument("--greedy", action="store_true", help="always take the most likely token (the default)")
    group.add_argument("--temperature", type=float, default=None, metavar="T", help="sample with temperature T")
    group.add_argument("--top-k", type=int, default=None, metavar="K", help="sample from the K most likely tokens")
    group.add_argument("--top-p", type=float, default=None, metavar="P", help="sample from the top-P probability mass")
    group.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    group.add_argument("--repetition-penalty", type=float, default=1.0, metavar="F",
                       help="divide the logits of tokens already seen (prompt and answer) by F, or multiply the "
                       "negative ones (1.2 is usual; default: 1.0, off)")  # fmt: skip
    group.add_argument("--no-repeat-ngram", type=int, default=0, metavar="N",
                       help="never repeat an N-token sequence already seen (3 is usual; default: 0, off)")  # fmt: skip


def add_speculative_arguments(parser: argparse.ArgumentParser) -> None:
    """`--speculative [auto|K]`, `--draft SPEC`, `--draft-model M` -> `speculative_from(args)`."""
    group = parser.add_argument_group("speculative decoding (docs/SPECULATIVE.md)")
    group.add_argument("--speculative", nargs="?", const="auto", default=None, metavar="auto|K",
                       help="a drafter on the device proposes tokens and the model verifies them in one pass per "
                       "round trip; the tokens stay the model's own (greedy: identical; sampled: same distribution). "
                       "K drafts per round, or auto (the default when the flag is given alone): chosen each round "
                       "from measured acceptance and round-trip time, 0 (plain decoding) when drafting does not pay")  # fmt: skip
    group.add_argument("--draft", default=None, metavar="SPEC",
                       help="the drafter: a quantization scheme applied to the model itself (default: int4-g32, "
                       "about 100 MB), exit:FILE (the device's first layers with an exit head trained by "
                       "`edgellm draft train-exit`), or model:NAME|DIR (a smaller model with the same tokenizer)")  # fmt: skip
    group.add_argument(
        "--draft-model",
        default=None,
        metavar="M",
        help="a smaller model with the same tokenizer as the drafter (same as --draft model:M)",
    )


def speculative_from(args: argparse.Namespace) -> dict[str, str] | None:
    """The speculative flags as a generate request's fields (`speculative`, `draft`), or None when off.

    Raises:
        ConfigError: --draft and --draft-model together, or either without --speculative.
    """
    if args.draft is not None and args.draft_model is not None:
        raise ConfigError("give --draft or --draft-model, not both")
    draft = f"model:{args.draft_model}" if args.draft_model is not None else args.draft
    if args.speculative is None:
        if draft is not None:
            raise ConfigError("--draft and --draft-model choose the drafter of --speculative; add --speculative")
        return None
    return {"speculative": args.speculative, **({"draft": draft} if draft is not None else {})}


def speculative_config(args: argparse.Namespace) -> SpeculativeConfig | None:
    """`speculative_from` as a config (imports the library). Raises ConfigError on a bad value."""
    from edgellm.spec.config import DEFAULT_DRAFT, SpeculativeConfig

    fields = speculative_from(args)
    if fields is None:
        return None
    return SpeculativeConfig.parse(fields["speculative"], fields.get("draft", DEFAULT_DRAFT))


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    """`--no-chat` (raw text) and `--chat` (the default, accepted for compatibility) -> `args.chat`."""
    parser.add_argument("--chat", dest="chat", action="store_true", default=True,
                        help="wrap the prompt in the model's chat template (the default)")  # fmt: skip
    parser.add_argument("--no-chat", dest="chat", action="store_false",
                        help="send the prompt as raw text, without the chat template")  # fmt: skip


def sampling_from(args: argparse.Namespace) -> SamplingConfig:
    """The decoding flags as a config. Raises ConfigError on a contradiction or a bad value."""
    from edgellm.model.sampling import SamplingConfig

    sampled = any(v is not None for v in (args.temperature, args.top_k, args.top_p))
    if args.greedy and sampled:
        raise ConfigError("--greedy cannot be combined with --temperature/--top-k/--top-p")
    return SamplingConfig(
        greedy=not sampled,
        temperature=1.0 if args.temperature is None else args.temperature,
        top_k=args.top_k or 0,
        top_p=1.0 if args.top_p is None else args.top_p,
        seed=args.seed,
        repetition_penalty=args.repetition_penalty,
        no_repeat_ngram=args.no_repeat_ngram,
    )


def run(args: argparse.Namespace) -> int:
    from edgellm.model.sampling import detect_loop
    from edgellm.model.stage import parse_cuts
    from edgellm.serve.local_engine import LocalSplitConfig, PromptConfig, generate_text, load_split

    args.prompt = read_prompt(args.prompt)
    sampling = sampling_from(args)
    speculative = speculative_config(args)
    dp = dp_config(args)
    split = LocalSplitConfig(
        args.model, parse_cuts(args.cuts), args.head, args.dtype, args.threads, args.quant, args.engine
    )
    options = PromptConfig(chat=args.chat, max_new_tokens=args.max_new_tokens, sampling=sampling,
                           speculative=speculative, dp=dp)  # fmt: skip
    loaded = load_split(split)
    if args.json:
        report = generate_text(loaded, args.prompt, options)
        print(json.dumps({**report, "loop_detected": detect_loop(report["new_tokens"])}))
        return 0
    report = generate_text(loaded, args.prompt, options, on_text=echo_text)
    print()
    if not getattr(args, "quiet", False):
        with contextlib.redirect_stdout(sys.stderr):  # stdout is the answer alone: `generate ... > answer.txt`
            print_summary(report)
            print_loop_hint(report["new_tokens"], sampling)
    return 0


def read_prompt(prompt: str | None) -> str:
    """The prompt argument; `-`, or no argument while stdin is not a terminal, reads it from stdin.

    Raises:
        ConfigError: no prompt argument and stdin is a terminal, or the prompt read is empty.
    """
    from edgellm.errors import ConfigError

    if prompt is None and sys.stdin.isatty():
        raise ConfigError("give a PROMPT argument, or pipe the prompt on stdin (or pass '-')")
    if prompt is None or prompt == "-":
        prompt = sys.stdin.read()
        if not prompt.strip():
            raise ConfigError("the prompt read from stdin is empty")
    return prompt


def echo_text(text: str) -> None:
    """Write streamed text as it arrives (the `on_text` of every streaming command)."""
    sys.stdout.write(text)
    sys.stdout.flush()


def print_loop_hint(new_tokens: list[int], sampling: SamplingConfig) -> None:
    """One hint line when the answer ended in a loop and the repetition guard was off."""
    from edgellm.model.sampling import detect_loop

    if not sampling.guarded and detect_loop(new_tokens):
        print("edgellm: hint: the answer ends in a loop; try --repetition-penalty 1.2 or --no-repeat-ngram 3")


def print_summary(report: dict) -> None:
    """The stage table printed after the streamed text."""
    tokens = len(report["new_tokens"])
    print(
        f"\n{report['model']} ({report['dtype']}, quant {report['quant']}, {report['threads']} threads), "
        f"cuts {report['cuts'] or 'none'}, "
        f"head on {report['head']}: {tokens} tokens, TTFT {report['ttft_ms']:.0f} ms, "
        f"{report['decode_tok_per_s']:.1f} tok/s decode"
    )
    print_speculative(report)
    if report.get("privacy"):
        print(f"privacy, {privacy_line(report['privacy'])}")
    print(f"{'stage':<28} {'layers':>9} {'compute ms':>11} {'ms/call':>8} {'weights MB':>11}")
    for s in report["stages"]:
        per_call = s["compute_ms"] / max(s["calls"], 1)
        layers = f"{s['layers'][0]}-{s['layers'][1]}"
        print(f"{s['name']:<28} {layers:>9} {s['compute_ms']:>11.1f} {per_call:>8.2f} {s['weight_bytes'] / 1e6:>11.1f}")


def print_speculative(report: dict) -> None:
    """One line on drafting, when the run drafted."""
    spec = report.get("speculative")
    if not spec:
        return
    rate = "-" if spec["acceptance_rate"] is None else f"{spec['acceptance_rate']:.0%}"
    per_round = "-" if spec["tokens_per_round"] is None else f"{spec['tokens_per_round']:.2f}"
    print(f"speculative: drafter {spec['drafter']}, k {spec['k']}, {spec['rounds']} rounds, acceptance {rate}, "
          f"{per_round} tokens per round trip, drafts per round {spec['k_counts']}")  # fmt: skip


def add_quant_arguments(parser: argparse.ArgumentParser) -> None:
    """`--quant SCHEME[,PATTERN=SCHEME...]`: weight-only quantization of every stage."""
    parser.add_argument(
        "--quant",
        default=NO_QUANT,
        metavar="SCHEME",
        help=f"weight-only quantization of every stage's linear layers and embeddings: one of "
        f"{[NO_QUANT, *QUANT_SCHEMES]}, each optionally ending in a scale search, -mse (error-minimising scales) "
        "or -gptq (GPTQ on shipped calibration text), e.g. int4-g64-gptq; then optional per-module rules "
        f"PATTERN=SCHEME|none with PATTERN one of {list(QUANT_PARTS)} or a module-name pattern, e.g. "
        "int4-g32,head=int8 (default: none)",
    )
