"""`edgellm calc`: memory and trainable parameters of fine-tuning or serving a model, whole or split over nodes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from edgellm.calc.config import (
    FORMATS,
    HEADS,
    METHODS,
    OPTIMIZER_STATES,
    CalcConfig,
    Precision,
    Split,
    Workload,
    get_method,
    lora_setup,
    parse_cuts,
    parse_format,
    parse_size,
)
from edgellm.calc.memory import calculate
from edgellm.calc.presets import PRESETS, get_preset
from edgellm.calc.report import Described, compare_text, report_json, report_text
from edgellm.calc.shape import MODEL_TYPES, shape_from_config
from edgellm.errors import ConfigError

DEFAULT_PRESET = "smollm2-135m"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "calc",
        help="memory and trainable parameters of fine-tuning or serving a model, per node of a split",
        description="Compute, without loading any weights, the memory a model needs by component (weights, "
        "gradients, optimizer states, activations, KV cache) and its trainable parameters, for the whole model and "
        "for each node of a split, and print every assumption behind the numbers. The model is a named preset or "
        "a Hugging Face config. See docs/CALC.md.",
    )
    what = parser.add_argument_group("model (one of)")
    what.add_argument(
        "--preset",
        metavar="NAME[,NAME...]",
        help=f"a named model, or several to compare: {', '.join(PRESETS)} (default: {DEFAULT_PRESET})",
    )
    what.add_argument(
        "--model",
        metavar="CONFIG",
        help="a config.json file, a Hugging Face model directory, or a registered model name (fetched into the "
        f"cache first if it is not there); its model_type one of {', '.join(MODEL_TYPES)}",
    )
    how = parser.add_argument_group("method")
    how.add_argument(
        "--method",
        default="full",
        help=f"{', '.join(METHODS)}: all parameters train, LoRA adapters on a frozen base (qlora: "
        "4-bit NF4 base, rank 64 on all linear layers, checkpointing), or serving with a KV cache "
        "(default: full)",
    )
    how.add_argument("--lora-rank", type=int, metavar="R", help="LoRA rank (default: 8 for lora, 64 for qlora)")
    how.add_argument(
        "--target-modules",
        metavar="M1,M2",
        help="modules LoRA adapts, matched as peft matches them, or all-linear (default for lora: the q and v "
        "projections, or the fused qkv projection where the model has one; for qlora: all-linear)",
    )
    bits = parser.add_argument_group("bit-widths")
    bits.add_argument(
        "--weights",
        metavar="FORMAT",
        help=f"the layers' linear weights: {', '.join(FORMATS)}, or a number of bits (default: bf16; nf4-dq for qlora)",
    )
    bits.add_argument("--adapter-bits", type=int, default=16, metavar="B", help="LoRA's A and B (default: 16)")
    bits.add_argument("--grad-bits", type=int, metavar="B", help="gradients (default: the trainable weights' bits)")
    bits.add_argument(
        "--optimizer",
        default="adam",
        help=f"{', '.join(OPTIMIZER_STATES)}: 2, 1 or 0 states per trainable parameter (default: adam)",
    )
    bits.add_argument("--optimizer-bits", type=int, default=32, metavar="B", help="each optimizer state (default: 32)")
    bits.add_argument(
        "--master-weights",
        action="store_true",
        help="also keep an fp32 copy of the trainable weights (mixed precision's 16 B per parameter)",
    )
    bits.add_argument("--act-bits", type=int, default=16, metavar="B", help="activations (default: 16)")
    bits.add_argument("--kv-bits", type=int, default=16, metavar="B", help="KV cache entries (default: 16)")
    work = parser.add_argument_group("workload and split")
    work.add_argument("--batch-size", type=int, default=1, metavar="B", help="sequences per step (default: 1)")
    work.add_argument(
        "--seq-len",
        type=int,
        default=512,
        metavar="S",
        help="tokens per sequence; for inference, the KV cache's length (default: 512)",
    )
    work.add_argument(
        "--checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="activation checkpointing (default: on for qlora, off otherwise)",
    )
    work.add_argument(
        "--cuts",
        metavar="C1,C2",
        help="split before these layers, as edgellm's --cuts: the device holds the embedding and "
        "layers [0, C1), the next node [C1, C2), ... (default: no split)",
    )
    work.add_argument(
        "--head", default="device", help=f"{' or '.join(HEADS)}: where the final norm and LM head go (default: device)"
    )
    work.add_argument(
        "--nodes", metavar="N1,N2", help="names of the nodes, one more than cuts (default: device, edge1, edge2, ...)"
    )
    parser.add_argument(
        "--budget",
        metavar="SIZE",
        help="say whether the whole model and each node fit SIZE (e.g. 24GB, 24GiB) and, if not, "
        "at how many bits per linear weight it would",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object (a list for several presets)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    method = get_method(args.method)
    config = CalcConfig(
        method=method,
        lora=lora_setup(method, args.lora_rank, _names(args.target_modules, "--target-modules")),
        precision=Precision(
            weights=parse_format(args.weights or method.weights),
            adapter_bits=args.adapter_bits,
            grad_bits=args.grad_bits,
            optimizer=args.optimizer,
            optimizer_bits=args.optimizer_bits,
            master_weights=args.master_weights,
            act_bits=args.act_bits,
            kv_bits=args.kv_bits,
        ),
        workload=Workload(
            args.batch_size, args.seq_len, method.checkpointing if args.checkpointing is None else args.checkpointing
        ),
        split=Split(parse_cuts(args.cuts), args.head, _names(args.nodes, "--nodes")),
    )
    budget = parse_size(args.budget) if args.budget is not None else None
    models = _models(args)
    if len(models) > 1 and config.split.cuts:
        raise ConfigError("--cuts applies to one model: name a single --preset")
    described = [
        Described(calculate(shape_from_config(cfg, name), config), source, preset)
        for cfg, name, source, preset in models
    ]
    if args.json:
        docs = [report_json(d, budget) for d in described]
        print(json.dumps(docs[0] if len(docs) == 1 else docs, indent=2))
    else:
        print(report_text(described[0], budget) if len(described) == 1 else compare_text(described, budget))
    return 0


def _names(text: str | None, flag: str) -> tuple[str, ...] | None:
    if text is None:
        return None
    names = tuple(part.strip() for part in text.split(","))
    if not all(names):
        raise ConfigError(f"{flag} takes comma-separated names, got {text!r}")
    return names


def _models(args: argparse.Namespace) -> list[tuple[dict[str, Any], str, str, Any]]:
    """(config, name, source, preset or None) for each model asked for."""
    if args.model is not None and args.preset is not None:
        raise ConfigError("give --preset or --model, not both")
    if args.model is not None:
        path = _config_file(args.model)
        name = args.model if args.model == Path(args.model).name else path.parent.name
        return [(_read_config(path), name, f"{path} (a Hugging Face config)", None)]
    names = _names(args.preset or DEFAULT_PRESET, "--preset") or ()
    return [(p.config, p.name, p.source, p) for p in map(get_preset, names)]


def _config_file(spec: str) -> Path:
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() == ".json":
        return path
    from edgellm.store import resolve_model  # a registered name may need fetching first

    return resolve_model(spec) / "config.json"


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the model config {path}: {exc}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} is not a JSON object, so not a Hugging Face config")
    return config
