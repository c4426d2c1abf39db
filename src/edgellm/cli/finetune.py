"""`edgellm finetune`: LoRA / QLoRA fine-tuning through a split model, one or many devices; QAT (`--qat`) and full
fine-tuning of a layer range (`--train-layers`)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
from pathlib import Path
from typing import Any

from edgellm.cli.choices import LORA_TARGETS, SHARE_MODES
from edgellm.cli.dp_options import add_dp_arguments, dp_config, dp_fedavg_config, privacy_line
from edgellm.cli.flower_options import add_flower_arguments, flower_settings, flower_used
from edgellm.errors import ConfigError
from edgellm.progress import Phase, note
from edgellm.store.registry import DEFAULT_MODEL
from edgellm.train.tasks import TASKS

# The library (torch, transformers) is imported inside the functions that run a command, not here: building the
# parser for `edgellm --help` must stay light (tests/test_cli_light.py).

log = logging.getLogger("edgellm.finetune")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "finetune",
        help="LoRA/QLoRA fine-tuning through the split (split learning, split federated learning)",
        description="Fine-tune LoRA adapters through a split model. With --topology the device runs the embedding, "
        "its first layers and the head (labels and text stay on it) and the servers run the rest, each training "
        "its own adapters on activation gradients sent back over the links; --clients K runs K device processes "
        "whose device-side adapters are averaged (FedAvg) every --aggregate-every steps at the first server. "
        "Without --topology the whole model trains in this process (centralized), or with --clients K in K "
        "processes that meet at an aggregator (federated, no split). The servers are started as local processes "
        "unless --no-launch. The trained adapter is written in peft format to DIR/adapter (--output DIR). With "
        "--engine flower the devices run as Flower ClientApps on Flower's simulation engine and a Flower strategy "
        "aggregates their adapters (sampling, FedProx, FedAdam, DP-FedAvg).",
    )
    data = parser.add_mutually_exclusive_group()
    data.add_argument("--data", type=Path, metavar="FILE", help="a text file, or JSONL of {prompt, response}")
    data.add_argument("--task", choices=sorted(TASKS), help="a built-in task (see `edgellm eval task`)")
    parser.add_argument("--steps", type=int, help="training steps per client (required)")
    parser.add_argument(
        "--topology", type=Path, metavar="T.toml", help="the split deployment (head must be on the device)"
    )
    parser.add_argument("--clients", type=int, default=1, help="device processes training together (default: 1)")
    parser.add_argument(
        "--aggregate-every", type=int, default=10, metavar="I", help="steps between FedAvg rounds (default: 10)"
    )
    parser.add_argument(
        "--share",
        choices=list(SHARE_MODES),
        default="shared",
        help="server-side adapters: one shared by all clients, or one per client (default: shared)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("edgellm-finetune"),
        metavar="DIR",
        help="run folder: checkpoints, logs, the exported adapter (default: ./edgellm-finetune)",
    )
    parser.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        metavar="N",
        help="steps between checkpoints, written in --output (the servers this command starts write theirs in "
        "DIR/checkpoints); 0: none but the one after the last step, which --resume needs to finish an "
        "interrupted export (default: 0)",
    )
    parser.add_argument("--init-adapter", type=Path, metavar="DIR", help="a peft LoRA adapter to start from")
    parser.add_argument("--no-launch", action="store_true", help="use servers that are already running")
    parser.add_argument(
        "--client",
        type=int,
        metavar="K",
        help="run only device client K, in this process, against running servers (with --no-launch): "
        "how each device joins from its own machine",
    )
    parser.add_argument(
        "--run",
        dest="run_label",
        metavar="NAME",
        help="the run's name on the servers (adapters, checkpoints, FedAvg rounds); clients started separately "
        "(--client) must pass the same one (default: the name run.json in --output records, else the folder's "
        "name and a hash of its full path, so runs in folders named alike never collide)",
    )
    parser.add_argument(
        "--attempt",
        metavar="ID",
        help="launch id shared by separately started clients (--client); a new id makes the servers "
        "restart the run's adapters (fresh, or from the --resume checkpoint)",
    )
    lora = parser.add_argument_group("adapters and optimizer")
    lora.add_argument("--lora-rank", type=int, default=8, metavar="R", help="LoRA rank (default: 8)")
    lora.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha; scaling = alpha / rank (default: 16)")
    lora.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapter input (default: 0)")
    lora.add_argument(
        "--target-modules",
        default=",".join(LORA_TARGETS),
        metavar="M1,M2",
        help="module names to adapt, or all-linear (default: %(default)s)",
    )
    lora.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: 1e-3)")
    lora.add_argument("--batch-size", type=int, default=8, help="rows per step (default: 8)")
    lora.add_argument("--seq-len", type=int, default=128, help="longest row in tokens (default: 128)")
    lora.add_argument("--seed", type=int, default=0, help="data order, adapter init and dropout (default: 0)")
    lora.add_argument(
        "--task-examples",
        type=int,
        default=2000,
        metavar="N",
        help="training examples generated for --task (default: 2000)",
    )
    lora.add_argument(
        "--round-timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="a FedAvg round closes this long after its first client, without the missing ones; a client silent "
        "this long between its forward and backward loses a shared adapter's turn (default: 120)",
    )
    model = parser.add_argument_group("model (without --topology; with one, the topology names it)")
    model.add_argument(
        "--model", default=DEFAULT_MODEL, help="registered name, model directory or .gguf (default: %(default)s)"
    )
    model.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weight precision (default: fp32)")
    parser.add_argument(
        "--quant", metavar="SCHEME", help="quantize the frozen base of every stage (QLoRA), e.g. nf4-g64 or int4-g32"
    )
    qat = parser.add_argument_group("quantization-aware training and full fine-tuning")
    qat.add_argument(
        "--qat",
        metavar="SCHEME",
        help="quantization-aware training: every side computes with the weights it trains fake-quantized with "
        "SCHEME (--quant's syntax, e.g. int4-g64 or int4-g32,head=int8,embed=int8); LoRA adapters train through "
        "the quantizer of their merged weight; the run exports the trained model to DIR/model with its quantized "
        "stage (load it with --model DIR/model --quant SCHEME)",
    )
    qat.add_argument(
        "--train-layers",
        metavar="A:B",
        help="full fine-tuning of decoder layers A..B-1 (all their weights; with a topology, layers the device "
        "holds); exports the trained model to DIR/model",
    )
    qat.add_argument(
        "--no-lora", action="store_true", help="train no LoRA adapters, only --train-layers (without a topology)"
    )
    add_dp_arguments(parser, training=True)
    add_flower_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON report at the end")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # a client process started by finetune
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from edgellm.lora.config import LoraSpec
    from edgellm.quant.scheme import parse_quant
    from edgellm.splitlearn.settings import OptimSpec
    from edgellm.train.client import ClientPlan
    from edgellm.train.config import DataSpec, TrainConfig
    from edgellm.train.coordinator import FinetuneJob, finetune, run_name, run_worker

    if args.worker is not None:
        return run_worker(args.worker)
    if args.steps is None:
        raise ConfigError("--steps is required")
    if args.data is None and args.task is None:
        raise ConfigError("give the training data: --data FILE or --task NAME")

    parse_quant(args.quant)  # a bad scheme fails here, before any process starts
    if args.qat is not None and args.quant is not None:
        raise ConfigError("--qat trains through the floating-point weights: drop --quant (QLoRA's frozen base)")
    if args.no_lora and args.topology is not None:
        raise ConfigError("--no-lora needs a run without --topology: the servers' stages train LoRA adapters")
    if args.no_lora and args.init_adapter is not None:
        raise ConfigError("--init-adapter starts LoRA adapters, which --no-lora leaves out: drop one of them")
    if args.client is not None and args.clients > 1 and not args.run_label:
        raise ConfigError("clients that start separately must share one run name: pass the same --run NAME to each")
    config = TrainConfig(
        steps=args.steps,
        data=DataSpec(path=args.data, task=args.task, task_examples=args.task_examples),
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lora=LoraSpec(
            r=args.lora_rank,
            alpha=args.lora_alpha,
            dropout=args.lora_dropout,
            target_modules=tuple(m.strip() for m in args.target_modules.split(",") if m.strip()),
            init_seed=args.seed,
        ),  # fmt: skip
        optim=OptimSpec(lr=args.lr),
        seed=args.seed,
        share=args.share,
        clients=args.clients,
        aggregate_every=args.aggregate_every,
        checkpoint_every=args.checkpoint_every,
        round_timeout_s=args.round_timeout,
        dp=dp_config(args),
        dp_fedavg=dp_fedavg_config(args),
        qat=args.qat,
        train_layers=None if args.train_layers is None else parse_layer_range(args.train_layers),
        adapters=not args.no_lora,
    )
    plan = ClientPlan(
        config=config, output=args.output, run=args.run_label or run_name(args.output), attempt="", topology=args.topology,
        model=args.model, dtype=args.dtype, resume=args.resume, init_adapter=args.init_adapter,
    )  # fmt: skip
    if args.engine != "flower" and flower_used(args):
        raise ConfigError("--strategy/--fraction/--min-clients/... are options of --engine flower: add it")
    settings = flower_settings(args) if args.engine == "flower" else None
    if settings is not None and args.print_run_config:
        from edgellm.flower.deploy import print_run_config

        return print_run_config(FinetuneJob(plan, not args.no_launch, args.quant, args.client, args.attempt), settings)
    # Ctrl-C and SIGTERM unwind (stopping every process this command started), even where the parent shell
    # started us with SIGINT ignored.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    total = config.steps * (config.clients if args.client is None else 1)
    if settings is not None:  # the devices Flower samples per round
        total = config.steps * min(config.clients, max(int(config.clients * settings.fraction), settings.min_clients))
    with Phase("finetune", total=total, unit="steps", log=log) as phase:
        job = FinetuneJob(plan, not args.no_launch, args.quant, args.client, args.attempt)
        if settings is not None:
            from edgellm.flower.runner import run_flower

            result = run_flower(job, settings, lambda event: _on_event(phase, event))
        else:
            result = finetune(job, lambda event: _on_event(phase, event))
    if args.json:
        print(json.dumps(result))
    else:
        _print_summary(result)
    return 0


def parse_layer_range(text: str) -> tuple[int, int]:
    """`"4:8"` -> (4, 8): decoder layers 4..7.

    Raises:
        ConfigError: not two integers around a colon.
    """
    start, colon, end = text.partition(":")
    try:
        if not colon:
            raise ValueError
        return int(start), int(end)
    except ValueError:
        raise ConfigError(f"--train-layers takes A:B (layers A..B-1, e.g. 0:30), got {text!r}") from None


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def _on_event(phase: Phase, event: dict[str, Any]) -> None:
    """Count steps over all clients; the latest loss, step time and bytes ride along in the bar and log lines."""
    if event["event"] == "open":  # a resumed client starts past its checkpoint
        phase.advance(event["start_step"])
    elif event["event"] == "dropped":
        where = f" of round {event['round']}" if "round" in event else ""
        note(log, "client %s dropped out%s: %s", event["client"], where, event["error"])
    elif event["event"] == "failover":  # the run goes on through a replica from its last checkpoint
        note(log, "client %s: %s down (%s); resuming from step %d through a replica", event["client"],
             ", ".join(event["down"]), event["error"], event["resume_step"])  # fmt: skip
        phase.update(0)  # the next `open` advances to the checkpoint
    elif event["event"] == "step":
        sent = sum(event["bytes"].values())
        phase.detail = (
            f"client {event['client']} loss {event['loss']:.4f} {event['step_ms']:.0f} ms/step {sent / 1e6:.2f} MB/step"
        )
        phase.advance()


def _print_summary(result: dict[str, Any]) -> None:
    losses = result["losses"]
    first = {k: v[0] for k, v in losses.items() if v}
    print(f"run {result['run']}: {result['steps']} steps x {result['clients']} client(s) on {result['data']} "
          f"in {result['wall_s']:.1f} s ({result['step_ms']:.0f} ms/step)")  # fmt: skip
    for client, values in losses.items():
        print(f"  client {client}: loss {first[client]:.4f} -> {values[-1]:.4f}")
    servers = ", ".join(f"{n} {p:,}" for n, p in result["server_trainable_params"].items()) or "none"
    print(f"  trainable parameters: device {result['device_trainable_params']:,}; servers: {servers}")
    for link, nbytes in result["bytes_per_step"].items():
        print(f"  {link}: {nbytes / 1e6:.3f} MB per step (both directions)")
    for adapter in result["adapters"]:
        print(f"  adapter (peft format): {adapter}")
    for export in result.get("exports", []):
        quant = f" --quant {export['quant']}" if export["quant"] else ""
        print(f"  model: {export['model']} (load it with --model {export['model']}{quant})")
        for path in export["stage_files"]:
            print(f"  quantized stage: {path}")
    for client, ledgers in (result.get("privacy") or {}).items():
        for ledger in ledgers.values():
            print(f"  privacy, client {client}: {privacy_line(ledger)}")
    flower = result.get("flower")
    if flower:
        print(
            f"  Flower {flower['strategy']}: {flower['rounds']} rounds, {flower['rounds_per_min']:.1f} rounds/min, "
            f"{flower['adapter_bytes_per_round'] / 1e6:.3f} MB of adapters per round"
        )
    if result["dropped_clients"]:
        print(f"  dropped out: client(s) {result['dropped_clients']} (see {result['output']}/logs)")
