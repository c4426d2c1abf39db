"""A node's memory budget (`memory_mb`): what its process needs, predicted before it loads its stages and checked
after, and what every node reports.

A node process needs, all resident at once:

- its **runtime**: the interpreter, torch, transformers, gRPC: the process's RSS before it loads any weight
  (`split.budget.rss_bytes`; about 320 MB for `edgellm node` on Linux with torch 2.x, see docs/TOPOLOGY.md);
- its stages' **weights**, at their quantized size, from the model config alone (`model.build.meta_stages` +
  `quant.memory.planned_weight_bytes`: exact, nothing is loaded);
- the **KV cache** of one session at the deployment's `max_context` (every further session reserves its own while
  the node serves: `split.budget.MemoryLedger`);
- **activations** of the largest forward pass, a prefill of `max_context` tokens (`activation_bytes`).

`check_need` refuses a node whose need passes its budget, naming each part; the node builder runs it before
loading (predicted runtime and weights) and after (measured RSS in place of both).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from edgellm.errors import ConfigError, PeerError
from edgellm.model.arch import max_positions
from edgellm.model.build import meta_stages
from edgellm.model.kv import capacity_for
from edgellm.model.stage import Stage, StageSpec
from edgellm.quant.memory import kv_bytes_per_token, planned_weight_bytes, stage_memory
from edgellm.quant.scheme import QuantConfig
from edgellm.split.budget import MB, MemoryLedger, NodeEmulation, StageMemory, rss_bytes

log = logging.getLogger(__name__)

# Activation estimate, per token of a prefill, in elements of the model's dtype (see `activation_bytes`).
MLP_COPIES = 4  # gate, up, act(gate) * up, and the down projection's input, each [S, I]
HIDDEN_COPIES = 7  # residual, normed input, q/k/v/attention output and o_proj output, each about [S, D]
# Each further layer leaves about one [S, D] buffer behind in the allocator until the pass ends (measured).


def effective_max_context(requested: int, model_config: Any) -> int:
    """`deployment.max_context`, clamped to the model's own limit (its position embeddings; a sliding window
    limits nothing, stages mask it): the default 2048 must work with a model of 1024 positions, so a larger value
    is lowered, with a log line, rather than refused."""
    limit = max_positions(model_config)
    if requested > limit:
        log.info("max_context %d is past the model's limit of %d tokens; using %d", requested, limit, limit)
        return limit
    return requested


@dataclass(frozen=True)
class MemoryNeed:
    """What a node's process needs, in bytes, by part.

    Attributes:
        runtime_bytes: the process before loading (predicted) or with its stages loaded (measured; it then
            includes the weights, and `weight_bytes` is 0).
        weight_bytes: the stages' weights (0 when measured: inside `runtime_bytes`).
        kv_bytes: one session's KV cache at `max_context`.
        activation_bytes: a prefill of `max_context` tokens.
        max_context: tokens the KV cache and the activations are sized for.
        measured: True when `runtime_bytes` is the RSS after loading.
    """

    runtime_bytes: int
    weight_bytes: int
    kv_bytes: int
    activation_bytes: int
    max_context: int
    measured: bool = False

    @property
    def total_bytes(self) -> int:
        return self.runtime_bytes + self.weight_bytes + self.kv_bytes + self.activation_bytes

    def describe(self) -> str:
        """`1043 MB (runtime 498 + weights 538 + KV for 2048 tokens 94 + activations 12)`."""
        first = (
            f"measured RSS after loading {_mb(self.runtime_bytes)}"
            if self.measured
            else f"runtime {_mb(self.runtime_bytes)} + weights {_mb(self.weight_bytes)}"
        )
        return (
            f"{_mb(self.total_bytes)} MB ({first} + KV for {self.max_context} tokens {_mb(self.kv_bytes)} + "
            f"activations {_mb(self.activation_bytes)})"
        )


def _mb(nbytes: int) -> int:
    return round(nbytes / MB)


def activation_bytes(model_config: Any, specs: Sequence[StageSpec], tokens: int, dtype: torch.dtype) -> int:
    """Estimated peak bytes of activations while a node's stages prefill `tokens` tokens (batch 1).

    `tokens * elt * (4 * I + (7 + L) * D)` for `L` decoder layers of hidden size `D` and MLP size `I`: one
    layer's live tensors (the MLP's four `[S, I]` tensors, about seven `[S, D]` ones; attention itself runs fused,
    without an `[S, S]` score matrix) plus about one `[S, D]` buffer per layer that the allocator keeps until the
    pass ends. Calibrated on SmolLM2-135M in float32 on one thread (peak RSS growth of a 2048-token prefill, less
    its KV cache: 77, 121, 131 and 177 MB for 1, 5, 10 and 20 layers; the formula gives 88, 107, 131, 178). A
    node without decoder layers holds two `[S, D]` tensors; a head stage adds one row of float32 logits.
    """
    hidden = int(getattr(model_config, "hidden_size", None) or model_config.n_embd)
    inner = getattr(model_config, "intermediate_size", None) or getattr(model_config, "n_inner", None)
    inner = int(inner or 4 * hidden)
    elt = torch.empty((), dtype=dtype).element_size()
    layers = sum(spec.num_layers for spec in specs)
    per_token = MLP_COPIES * inner + (HIDDEN_COPIES + layers) * hidden if layers else 2 * hidden
    logits = 4 * int(model_config.vocab_size) if any(spec.head for spec in specs) else 0
    return tokens * elt * per_token + logits


def session_kv_bytes(model_config: Any, num_layers: int, tokens: int, dtype: torch.dtype, batch: int = 1) -> int:
    """One session's KV cache over `num_layers` layers once it holds `tokens` tokens: its buffers' full capacity
    (they double when full, `model.kv.capacity_for`) and the validity mask, as `split.host.StageHost` reserves."""
    if not num_layers:
        return 0
    return (kv_bytes_per_token(model_config, num_layers, dtype) + 1) * capacity_for(tokens) * batch


def predict_need(
    model_config: Any,
    specs: Sequence[StageSpec],
    quant: QuantConfig | None,
    dtype: torch.dtype,
    max_context: int,
    runtime_bytes: int,
) -> MemoryNeed:
    """What a node holding `specs` needs, before loading anything: weights from a meta-device build."""
    weights = sum(planned_weight_bytes(stage, quant) for stage in meta_stages(model_config, specs, dtype))
    layers = sum(spec.num_layers for spec in specs)
    return MemoryNeed(
        runtime_bytes,
        weights,
        session_kv_bytes(model_config, layers, max_context, dtype),
        activation_bytes(model_config, specs, max_context, dtype),
        max_context,
    )


def check_need(node: str, need: MemoryNeed, memory_mb: int | None, source: str = "") -> None:
    """Refuse a node whose need passes its budget.

    Raises:
        ConfigError: `"<source>: phone: needs 1043 MB (runtime 498 + weights 538 + KV for 2048 tokens 94 +
            activations 12), over its memory_mb of 800"`, with a hint.
    """
    if memory_mb is None or need.total_bytes <= memory_mb * MB:
        return
    prefix = f"{source}: " if source else ""
    raise ConfigError(
        f"{prefix}{node}: needs {need.describe()}, over its memory_mb of {memory_mb}; quantize its stages "
        '(node quant = "int8" or "int4"), give it fewer layers, lower deployment.max_context, or raise memory_mb'
    )


def ledger_after_load(node: str, predicted: MemoryNeed, memory_mb: int | None, source: str = "") -> MemoryLedger:
    """Measure the process once its stages are loaded, refuse it if over budget, and open its session ledger.

    The check is `check_need`'s with the measured RSS in place of the predicted runtime and weights (loading can
    leave more behind than the weights themselves). The ledger's free room for sessions is what is left after
    that RSS and the activations.

    Raises:
        ConfigError: as `check_need`, naming the measured RSS.
    """
    rss = rss_bytes()
    measured = MemoryNeed(rss, 0, predicted.kv_bytes, predicted.activation_bytes, predicted.max_context, True)
    check_need(node, measured, memory_mb, source)
    budget = None if memory_mb is None else memory_mb * MB
    return MemoryLedger(node, budget, rss, predicted.weight_bytes, predicted.activation_bytes)


@dataclass(frozen=True)
class NodeMemory:
    """A node's memory budget as its parts use it: stage hosts reserve sessions in `ledger`, and a stage loaded
    later (a live reconfiguration) is checked against the same budget.

    Attributes:
        ledger: the node's session ledger (`ledger_after_load`).
        model_config, dtype: of the deployed model, to size KV caches.
        max_context: tokens each session reserves.
        runtime_bytes: the process's RSS before it loaded any stage.
        source: the topology file, for messages.
    """

    ledger: MemoryLedger
    model_config: Any
    dtype: torch.dtype
    max_context: int
    runtime_bytes: int
    source: str = ""

    def for_stage(self, stage: Stage) -> StageMemory:
        """What a stage host of `stage` reserves per session."""
        return StageMemory(self.ledger, kv_bytes_per_token(self.model_config, stage.spec.num_layers, self.dtype))

    def check_stages(self, stages: Sequence[Stage]) -> None:
        """Refuse stages (all of the node's, loaded) that would pass the budget: the runtime measured at start,
        their exact weights, one session's KV cache and the activations.

        Raises:
            ConfigError: as `check_need`.
        """
        specs = [stage.spec for stage in stages]
        layers = sum(spec.num_layers for spec in specs)
        need = MemoryNeed(
            self.runtime_bytes,
            sum(stage_memory(stage).weight_bytes for stage in stages),
            session_kv_bytes(self.model_config, layers, self.max_context, self.dtype),
            activation_bytes(self.model_config, specs, self.max_context, self.dtype),
            self.max_context,
        )
        budget = self.ledger.budget_bytes
        check_need(self.ledger.node, need, None if budget is None else budget // MB, self.source)


class NodeStatus:
    """Per node of a deployment: its emulation (from the topology) and its memory (measured, where known).

    Called once at the end of each generation by the device (`serve.device.DeviceEngine`): the device's own
    memory comes from its ledger, each server's from its `Info`. A server that does not answer within
    `timeout_s` is reported without memory, and not asked again by this device.

    Args:
        emulations: node name -> its emulation.
        own: (the device's name, its ledger).
        servers: node name -> a function returning that node's `Info`.
        timeout_s: how long one `Info` may take.
    """

    def __init__(
        self,
        emulations: Mapping[str, NodeEmulation],
        own: tuple[str, MemoryLedger],
        servers: Mapping[str, Callable[[float], dict[str, Any]]],
        timeout_s: float = 1.0,
    ) -> None:
        self.emulations = emulations
        self.own = own
        self.servers = servers
        self.timeout_s = timeout_s
        self._silent: set[str] = set()

    def __call__(self) -> dict[str, dict[str, Any]]:
        out = {name: {"emulated": e.to_json()} for name, e in self.emulations.items()}
        name, ledger = self.own
        out.setdefault(name, {})["memory"] = ledger.report()
        for server, info in self.servers.items():
            if server in self._silent:
                continue
            try:
                memory = info(self.timeout_s).get("memory")
            except PeerError:
                self._silent.add(server)
                continue
            if isinstance(memory, dict):
                out.setdefault(server, {})["memory"] = memory
        return out
