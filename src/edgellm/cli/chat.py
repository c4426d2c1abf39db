"""`edgellm chat`: a multi-turn chat that loads the model once (or talks to a running deployment)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Iterable, Iterator
from typing import IO, TYPE_CHECKING

from edgellm.cli.generate import add_model_arguments, add_sampling_arguments, echo_text, sampling_from
from edgellm.errors import ConfigError

if TYPE_CHECKING:
    from edgellm.model.sampling import SamplingConfig
    from edgellm.serve.chat_session import ChatBackend, ChatSession, ChatTurn

# The library (torch, transformers, grpc) is imported inside the functions that run the chat, not here: building
# the parser for `edgellm --help` must stay light (tests/test_cli_light.py).

MODEL_FLAGS = ("model", "cuts", "head", "dtype", "threads", "quant")  # the in-process model's; not with --topology
PROMPT = "you> "
HELP_LINE = "/reset clears the history; /exit or Ctrl-D ends"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "chat",
        help="chat with the model over many turns, loading it once",
        description="Chat with the model over many turns: the model is loaded once, in this process with the "
        "stages cut at --cuts, or the turns go to a running deployment's device node with --topology. On a "
        "terminal each turn is read after a `you> ` prompt; otherwise one user turn per line of stdin. The "
        "answer streams on stdout, a stats line per turn goes to stderr. The oldest turns (never the system "
        f"prompt) are dropped when the conversation would not fit the context. {HELP_LINE}. Decoding is greedy "
        "unless --temperature, --top-k or --top-p is given.",
    )
    add_model_arguments(parser)
    parser.add_argument("--system", metavar="TEXT", default=None,
                        help="the system prompt (default: the chat template's own, if it has one)")  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=256, metavar="N",
                        help="stop each answer after N tokens (default: 256)")  # fmt: skip
    parser.add_argument("--max-context", type=int, default=None, metavar="N",
                        help="keep each turn (the templated conversation plus --max-new-tokens) within N tokens "
                        "(default: the model's context, or the deployment's max_context)")  # fmt: skip
    add_sampling_arguments(parser)
    parser.add_argument("--topology", metavar="T.toml", default=None,
                        help="chat through this running deployment's device node instead of loading the model "
                        "here (the model flags then come from the topology)")  # fmt: skip
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per turn (JSON lines) instead of streaming text")  # fmt: skip
    parser.set_defaults(run=run, model_defaults={name: parser.get_default(name) for name in MODEL_FLAGS})


def run(args: argparse.Namespace) -> int:
    from edgellm.serve.chat_session import ChatConfig, ChatSession

    sampling = sampling_from(args)
    config = ChatConfig(args.system, args.max_context)
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    interactive = sys.stdin.isatty()
    quiet = bool(getattr(args, "quiet", False))
    backend, ready = _deployment(args, sampling) if args.topology else _local(args, sampling)
    session = ChatSession(backend, config)
    if interactive and not quiet:
        print(f"{ready}; {HELP_LINE}", file=sys.stderr, flush=True)
    chat_loop(session, read_turns(sys.stdin, interactive), Display(args.json, quiet, interactive))
    return 0


def _local(args: argparse.Namespace, sampling: SamplingConfig) -> tuple[ChatBackend, str]:
    """The model loaded once in this process, and the line saying so."""
    from edgellm.model.stage import parse_cuts
    from edgellm.serve.local_engine import LocalChat, LocalSplitConfig, PromptConfig, load_split

    split = LocalSplitConfig(
        args.model, parse_cuts(args.cuts), args.head, args.dtype, args.threads, args.quant, args.engine
    )
    options = PromptConfig(chat=True, max_new_tokens=args.max_new_tokens, sampling=sampling)
    loaded = load_split(split)
    return LocalChat(loaded, options), f"{args.model} loaded in {loaded.load_s:.1f} s"


def _deployment(args: argparse.Namespace, sampling: SamplingConfig) -> tuple[ChatBackend, str]:
    """The topology's device node, and the model's tokenizer here to keep the turns within its context."""
    from edgellm.deploy.node_builder import channel_config
    from edgellm.deploy.topology import load_topology
    from edgellm.net.rpc import RemoteHop
    from edgellm.serve.chat_session import DeploymentChat
    from edgellm.store import resolve_model
    from edgellm.store.weights import load_tokenizer

    given = [f"--{name.replace('_', '-')}" for name in MODEL_FLAGS if getattr(args, name) != args.model_defaults[name]]
    if given:
        raise ConfigError(f"{', '.join(given)} set the model loaded here; with --topology the topology sets it")
    topology = load_topology(args.topology)
    device = topology.device
    if device.address is None:
        raise ConfigError(f"{topology.source}: the device node {device.name!r} has no address to reach it at")
    hop = RemoteHop(device.name, device.address, channel_config(topology), sender="cli")
    info = hop.info()  # within the deployment's deadline: an unreachable device fails here
    context = info.get("max_context")
    if not isinstance(context, int) or isinstance(context, bool):
        context = topology.limits.max_context  # a device that does not say: the topology's
    tokenizer = load_tokenizer(resolve_model(topology.model.name))
    backend = DeploymentChat(hop, tokenizer, context, args.max_new_tokens, sampling.to_json())
    return backend, f"connected to {device.name} at {device.address}"


def read_turns(stream: IO[str], interactive: bool) -> Iterator[str]:
    """User turns, one per line, until end of input; on a terminal each after a `you> ` prompt on stderr."""
    while True:
        if interactive:
            sys.stderr.write(PROMPT)
            sys.stderr.flush()
        line = stream.readline()
        if not line:
            if interactive:
                sys.stderr.write("\n")  # Ctrl-D leaves the cursor after the prompt
            return
        yield line.rstrip("\r\n")


@dataclasses.dataclass(frozen=True)
class Display:
    """How turns are shown: streamed text (or JSON lines) on stdout, notes and stats on stderr."""

    json: bool = False
    quiet: bool = False
    interactive: bool = False

    def note(self, text: str) -> None:
        print(f"[{text}]", file=sys.stderr, flush=True)

    def turn(self, index: int, user: str, turn: ChatTurn) -> None:
        """After an answer: its JSON line, or the end of its streamed line; then the stats line on stderr."""
        report = turn.report
        if turn.dropped_turns:
            oldest = "oldest turn" if turn.dropped_turns == 1 else f"{turn.dropped_turns} oldest turns"
            self.note(f"dropped the {oldest} to fit the context")
        if self.json:
            print(json.dumps({"turn": index, "user": user, "dropped_turns": turn.dropped_turns, **report}), flush=True)
            return
        print(flush=True)
        if not self.quiet:
            tokens = len(report["new_tokens"])
            self.note(f"{tokens} tokens, TTFT {report['ttft_ms']:.0f} ms, {report['decode_tok_per_s']:.1f} tok/s")


def chat_loop(session: ChatSession, lines: Iterable[str], display: Display) -> int:
    """Answer each line as a user turn; `/reset` clears the history, `/exit` ends. Returns the turns answered.

    Raises:
        ConfigError: a message that cannot fit the context, when not on a terminal (on one, it is said and skipped).
    """
    answered = 0
    for line in lines:
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            session.reset()
            display.note("history cleared")
            continue
        if text.startswith("/") and " " not in text:
            display.note(f"unknown command {text}; {HELP_LINE}")
            continue
        try:
            turn = session.ask(text, on_text=None if display.json else echo_text)
        except ConfigError as exc:
            if not display.interactive:
                raise
            display.note(f"error: {exc}")
            continue
        answered += 1
        display.turn(answered, text, turn)
    return answered
