"""Memory by component (weights, gradients, optimizer states, activations, KV cache) and trainable parameters,
for the whole model and for each node of a split. Pure arithmetic: bytes are exact for whole bit-widths and
rounded up to a byte per component otherwise.

Per token, per decoder layer, training keeps the activations `LayerShape.act_elements_per_token` counts, at
`act_bits` each: Korthikanti et al. 2022 (arXiv:2205.05198, §4.1) without dropout masks and without the [S, S]
attention scores (memory-efficient attention, as SDPA and FlashAttention run), generalised to gated MLPs and
grouped KV heads. LoRA adds its rank's elements per adapted module (A's output, kept for B's gradient). With
activation checkpointing a layer keeps only its input, plus one layer's full set while it is recomputed. The head
keeps the final norm's and the LM head's inputs and the loss's fp32 log-softmax over the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from edgellm.calc.config import ALL_LINEAR, OPTIMIZER_STATES, CalcConfig, LoraSetup
from edgellm.calc.layout import Holding, node_holdings
from edgellm.calc.shape import DEFAULT_LORA_TARGETS, Linear, ModelShape
from edgellm.errors import ConfigError

LOGIT_BITS = 32  # the loss upcasts logits to fp32 (as transformers' loss does) and keeps their log-softmax


@dataclass(frozen=True)
class Memory:
    """Bytes by component."""

    weights_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    kv_cache_bytes: int

    @property
    def model_state_bytes(self) -> int:
        """Weights + gradients + optimizer states: what a step needs before any activation."""
        return self.weights_bytes + self.gradients_bytes + self.optimizer_bytes

    @property
    def total_bytes(self) -> int:
        return self.model_state_bytes + self.activations_bytes + self.kv_cache_bytes


@dataclass(frozen=True)
class NodeReport:
    """One node's holding, its parameters (all, and those it trains) and its memory."""

    holding: Holding
    params: int
    trainable_params: int
    memory: Memory


@dataclass(frozen=True)
class CalcReport:
    """The answer: the whole model on one node (`whole`), and each node of the split (`nodes`).

    Attributes:
        model: the model's shape.
        config: what was asked.
        adapted: the layer's linear modules LoRA adapts (empty without adapters).
        whole: every part of the model on one node; `whole.params` counts a tied matrix once.
        nodes: each node of the split (one node holding everything when there are no cuts).
        bytes_per_trainable_param: weights + gradients + optimizer bytes per trainable parameter (full
            fine-tuning: the "12 bytes per parameter" of mixed-precision Adam without a master copy).
    """

    model: ModelShape
    config: CalcConfig
    adapted: tuple[Linear, ...]
    whole: NodeReport
    nodes: tuple[NodeReport, ...]
    bytes_per_trainable_param: float


def adapted_linears(shape: ModelShape, lora: LoraSetup) -> tuple[Linear, ...]:
    """The layer's linear modules that `lora.targets` names, matched as peft matches them: a target equals a
    module's name or is a dotted suffix of it ("c_proj" adapts both of GPT-2's `attn.c_proj` and `mlp.c_proj`).

    Raises:
        ConfigError: a target that names no module of this architecture (the message lists the valid names).
    """
    targets = lora.targets or DEFAULT_LORA_TARGETS[shape.model_type]
    linears = shape.layer.linears
    if targets == (ALL_LINEAR,):
        return linears
    unknown = [t for t in targets if not any(_matches(lin.name, t) for lin in linears)]
    if unknown:
        names = [lin.name.rsplit(".", 1)[-1] for lin in linears]
        raise ConfigError(
            f"unknown LoRA target module(s) {unknown} for {shape.name} ({shape.model_type}); its layers' linear "
            f"modules are {list(dict.fromkeys(names))}, or {ALL_LINEAR!r}"
        )
    return tuple(lin for lin in linears if any(_matches(lin.name, t) for t in targets))


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def lora_params_per_layer(adapted: tuple[Linear, ...], rank: int) -> int:
    """A `[r, in]` and B `[out, r]` per adapted module: r x (in + out) each (Hu et al. 2021, §4.2)."""
    return sum(rank * (lin.in_features + lin.out_features) for lin in adapted)


def holding_params(shape: ModelShape, h: Holding) -> int:
    """Parameters a node holds: a tied head on a node without the embedding holds its own copy of the matrix."""
    head = shape.final_norm_params + (0 if shape.tied and h.embed else shape.lm_head_params)
    return h.num_layers * shape.layer.params + (shape.embed_params if h.embed else 0) + (head if h.head else 0)


def _ceil_bytes(bits: Fraction) -> int:
    whole_bits = -(-bits.numerator // bits.denominator)  # ceil
    return -(-whole_bits // 8)


def node_report(shape: ModelShape, config: CalcConfig, h: Holding, adapted: tuple[Linear, ...]) -> NodeReport:
    """What one node holding `h` needs under `config`."""
    p = config.precision
    rank = config.lora.rank if config.lora is not None else 0
    lora_per_layer = lora_params_per_layer(adapted, rank)
    params = holding_params(shape, h)
    linear_params = h.num_layers * shape.layer.linear_weight_params
    weight_bits = (
        linear_params * Fraction(p.weights.bits)
        + (params - linear_params) * Fraction(p.float_bits)
        + h.num_layers * lora_per_layer * p.adapter_bits
    )
    trains = config.method.trains
    trainable = params if trains == "all" else h.num_layers * lora_per_layer if trains == "adapters" else 0
    trainable_bits = Fraction(p.float_bits) if trains == "all" else Fraction(p.adapter_bits)
    grad_bits = Fraction(p.grad_bits) if p.grad_bits is not None else trainable_bits
    master_bits = 32 if p.master_weights and trainable_bits < 32 else 0
    optimizer_bits = OPTIMIZER_STATES[p.optimizer] * p.optimizer_bits + master_bits
    tokens = config.workload.tokens
    acts = kv = Fraction(0)
    if trains != "none":
        acts = tokens * _activation_bits_per_token(shape, config, h, len(adapted) * rank)
    else:
        kv_per_token_layer = 2 * shape.dims.num_kv_heads * shape.dims.head_dim * p.kv_bits  # K and V
        kv = Fraction(tokens * h.num_layers * kv_per_token_layer)
    memory = Memory(
        weights_bytes=_ceil_bytes(weight_bits),
        gradients_bytes=_ceil_bytes(trainable * grad_bits),
        optimizer_bytes=_ceil_bytes(Fraction(trainable * optimizer_bits)),
        activations_bytes=_ceil_bytes(acts),
        kv_cache_bytes=_ceil_bytes(kv),
    )
    return NodeReport(h, params, trainable, memory)


def _activation_bits_per_token(shape: ModelShape, config: CalcConfig, h: Holding, lora_elements: int) -> Fraction:
    """Bits of activations kept for the backward pass, per token, on a node holding `h`."""
    d, act_bits = shape.dims.hidden_size, config.precision.act_bits
    per_layer = shape.layer.act_elements_per_token + lora_elements
    if config.workload.checkpointing:  # each layer's input, and one layer's full set while it is recomputed
        layer_elements = h.num_layers * d + (per_layer if h.num_layers else 0)
    else:
        layer_elements = h.num_layers * per_layer
    head_bits = (2 * d * act_bits + shape.dims.vocab_size * LOGIT_BITS) if h.head else 0
    return Fraction(layer_elements * act_bits + head_bits)


def calculate(shape: ModelShape, config: CalcConfig) -> CalcReport:
    """Memory and trainable parameters of `shape` under `config`, whole and per node.

    Raises:
        ConfigError: cuts that do not fit the model's layers, or LoRA targets it does not have.
    """
    adapted = adapted_linears(shape, config.lora) if config.lora is not None else ()
    everything = Holding("whole", 0, shape.dims.num_layers, True, True)
    whole = node_report(shape, config, everything, adapted)
    nodes = tuple(node_report(shape, config, h, adapted) for h in node_holdings(shape.dims.num_layers, config.split))
    per_param = whole.memory.model_state_bytes - _frozen_weight_bytes(config, whole)
    bytes_per_trainable = per_param / whole.trainable_params if whole.trainable_params else 0.0
    return CalcReport(shape, config, adapted, whole, nodes, bytes_per_trainable)


def _frozen_weight_bytes(config: CalcConfig, whole: NodeReport) -> int:
    """The whole model's weight bytes that do not train (the frozen base under LoRA; none under full)."""
    if config.method.trains == "all":
        return 0
    adapters_bits = whole.trainable_params * config.precision.adapter_bits
    return whole.memory.weights_bytes - _ceil_bytes(Fraction(adapters_bits))


def fits_at_weight_bits(report: CalcReport, budget_bytes: int) -> float | None:
    """The most bits per linear weight at which the whole model fits `budget_bytes`, all else as reported; None
    when even 0-bit linear weights would not fit."""
    shape, p = report.model, report.config.precision
    linear_params = shape.dims.num_layers * shape.layer.linear_weight_params
    linear_bytes = Fraction(linear_params) * Fraction(p.weights.bits) / 8
    rest = report.whole.memory.total_bytes - linear_bytes
    if rest >= budget_bytes:
        return None
    return float((budget_bytes - rest) * 8 / linear_params)
