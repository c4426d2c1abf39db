"""The cost model: what a plan costs on an instance (decode, time to first token, throughput, memory, ppl).

A plan runs on the path [device] + the stage nodes (thin client) or the stage nodes (device first). Each node
runs one stage; with head="device" the device also runs a separate head-only stage at the end, at its own scheme.

Messages (bytes): a hidden state of R rows costs header + R * (hidden_size * bytes_per_value + bytes_per_row) in
the hop's codec; token ids from a thin-client device cost header + R * token_bytes; a token id sent back costs
header + token_bytes. One message over a link costs fixed_ms + bytes * ms_per_byte in its direction ("up" is away
from the device along the plan's order).

Hops: chain mode sends device -> s1 -> ... -> sk and the reply retraces the chain, each hop's reply in that hop's
codec: hidden states (head="device") or the token id (head="server"). Star mode: the device calls each server in
turn over the device <-> server link and carries the hidden state between them; each reply is the server's output
hidden state, except the last server's when head="server" (a token id).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from edgellm.errors import ConfigError
from edgellm.plan.instance import CodecCost, Instance, LinkCaps, ModelDims, NodeCaps, SchemeCost
from edgellm.plan.placement import Plan

HIDDEN, TOKENS, TOKEN = "hidden", "tokens", "token"


@dataclass(frozen=True)
class PlanCost:
    """What a plan costs. memory_bytes maps each participating node to the bytes it holds."""

    decode_ms: float
    ttft_ms: float
    throughput_tok_s: float
    memory_bytes: dict[str, int]
    ppl_increase_pct: float

    def to_json(self) -> dict[str, object]:
        return {
            "decode_ms": self.decode_ms,
            "ttft_ms": self.ttft_ms,
            "throughput_tok_s": self.throughput_tok_s,
            "memory_bytes": dict(self.memory_bytes),
            "ppl_increase_pct": self.ppl_increase_pct,
        }


@dataclass(frozen=True)
class StageRun:
    """A node's part of a plan: `num_layers` layers at `scheme`, plus the embedding and/or head."""

    node: NodeCaps
    scheme: SchemeCost
    num_layers: int
    embeds: bool
    holds_head: bool
    separate_head: bool  # the head is its own stage (the device's, head="device")


@dataclass(frozen=True)
class HopRun:
    """One hop: `src` is the end nearer the device; `up` and `down` are the kinds of its two messages."""

    src: str
    dst: str
    link: LinkCaps
    codec: CodecCost
    up: str
    down: str

    @property
    def carries_hidden(self) -> bool:
        return HIDDEN in (self.up, self.down)


def stage_decode_ms(run: StageRun) -> float:
    """Compute per token: overhead + layers * layer_decode_ms [+ embed_decode_ms] [+ head_decode_ms]
    [+ overhead again when the head is a separate stage]."""
    ms = run.node.stage_overhead_ms + run.num_layers * run.scheme.layer_decode_ms
    if run.embeds:
        ms += run.scheme.embed_decode_ms
    if run.holds_head:
        ms += run.scheme.head_decode_ms
        if run.separate_head:
            ms += run.node.stage_overhead_ms
    return ms


def stage_prefill_ms(run: StageRun, prompt_tokens: int) -> float:
    """Compute of a P-token prompt: overhead + layers * P * layer_prefill_ms_per_token [+ embed_decode_ms]
    [+ head_decode_ms (the last position only)] [+ overhead again when the head is a separate stage]."""
    ms = run.node.stage_overhead_ms + run.num_layers * prompt_tokens * run.scheme.layer_prefill_ms_per_token
    if run.embeds:
        ms += run.scheme.embed_decode_ms
    if run.holds_head:
        ms += run.scheme.head_decode_ms
        if run.separate_head:
            ms += run.node.stage_overhead_ms
    return ms


def stage_memory_bytes(model: ModelDims, run: StageRun, sessions: int) -> int:
    """base + activation + layers * layer_bytes [+ embed] [+ head] + kv_per_token_per_layer * layers *
    max_context * sessions; a node holding both embedding and head of a tied model counts max(embed, head) once."""
    scheme = run.scheme
    weights = run.num_layers * scheme.layer_bytes
    if run.embeds and run.holds_head and model.tied_embeddings:
        weights += max(scheme.embed_bytes, scheme.head_bytes)
    else:
        weights += scheme.embed_bytes * run.embeds + scheme.head_bytes * run.holds_head
    kv = run.node.kv_bytes_per_token_per_layer * run.num_layers * model.max_context * sessions
    return run.node.base_bytes + run.node.activation_bytes + weights + kv


def message_bytes(model: ModelDims, codec: CodecCost, kind: str, rows: int) -> float:
    """hidden: header + rows * (hidden * bytes_per_value + bytes_per_row); tokens: header + rows * token_bytes;
    token (one id back): header + token_bytes."""
    if kind == HIDDEN:
        return model.header_bytes + rows * (model.hidden_size * codec.bytes_per_value + codec.bytes_per_row)
    if kind == TOKENS:
        return model.header_bytes + rows * model.token_bytes
    return model.header_bytes + model.token_bytes


def hop_kinds(mode: str, head: str, thin: bool, hop: int, num_hops: int) -> tuple[str, str]:
    """(up, down) message kinds of hop `hop` of `num_hops` (see the module docstring)."""
    up = TOKENS if thin and hop == 0 else HIDDEN
    if mode == "chain":
        return up, HIDDEN if head == "device" else TOKEN
    return up, TOKEN if head == "server" and hop == num_hops - 1 else HIDDEN


def problems(instance: Instance, plan: Plan, device_first: bool = True) -> list[str]:
    """Structural problems of a plan on an instance (empty: the cost functions can run it)."""
    out: list[str] = []
    device = instance.device.name
    names = [s.node for s in plan.stages]
    out += [f"unknown node {n!r}; nodes: {[x.name for x in instance.nodes]}" for n in names if instance.node(n) is None]
    out += [f"node {n!r} runs more than one stage" for n in sorted(set(names)) if names.count(n) > 1]
    thin = names[0] != device
    if thin and device_first:
        out.append(f"stage 0 must run on the device {device!r} (device first: raw text stays local)")
    if device in names[1:]:
        out.append(f"the device {device!r} can only run the first stage")
    if plan.num_layers != instance.model.num_layers:
        out.append(f"the stages cover layers [0, {plan.num_layers}) but the model has {instance.model.num_layers}")
    for stage in plan.stages:
        node = instance.node(stage.node)
        if node is not None and node.scheme(stage.scheme) is None:
            out.append(f"node {stage.node!r} has no scheme {stage.scheme!r}; it has {[s.name for s in node.schemes]}")
        if stage.node != device and stage.num_layers < 1:
            out.append(f"server stage on {stage.node!r} holds no layer")
    hops = len(plan.stages) - (0 if thin else 1)
    if len(plan.codecs) != hops:
        out.append(f"the plan has {hops} hops but {len(plan.codecs)} codecs")
    out += [
        f"unknown codec {c!r}; codecs: {[x.name for x in instance.codecs]}"
        for c in plan.codecs
        if instance.codec(c) is None
    ]
    if thin and plan.head == "device":
        out.append("a thin-client device holds no head: head must be 'server'")
    if plan.head == "server" and hops == 0:
        out.append("head='server' needs a server stage")
    path = [device] + names if thin else names
    pairs = zip(path, path[1:]) if plan.mode == "chain" else ((device, n) for n in path[1:])
    out += [f"no link between {a!r} and {b!r}" for a, b in pairs if instance.link(a, b) is None and a != b]
    return out


def layout(instance: Instance, plan: Plan) -> tuple[list[StageRun], list[HopRun]]:
    """The plan's stage runs and hops, in execution order.

    Raises:
        ConfigError: the plan does not fit the instance (every structural problem, in one line).
    """
    found = problems(instance, plan, device_first=False)
    if found:
        raise ConfigError("invalid plan: " + "; ".join(found))
    device = instance.device.name
    thin = plan.stages[0].node != device
    last = len(plan.stages) - 1
    runs = []
    for i, stage in enumerate(plan.stages):
        node = instance.node(stage.node)
        assert node is not None
        scheme = node.scheme(stage.scheme)
        assert scheme is not None
        on_device_head = plan.head == "device" and i == 0
        holds = on_device_head or (plan.head == "server" and i == last)
        runs.append(StageRun(node, scheme, stage.num_layers, i == 0, holds, on_device_head))
    path = [device] + [s.node for s in plan.stages] if thin else [s.node for s in plan.stages]
    hops = []
    for j, codec_name in enumerate(plan.codecs):
        src = path[j] if plan.mode == "chain" else device
        dst = path[j + 1]
        link = instance.link(src, dst)
        codec = instance.codec(codec_name)
        assert link is not None and codec is not None
        up, down = hop_kinds(plan.mode, plan.head, thin, j, len(plan.codecs))
        hops.append(HopRun(src, dst, link, codec, up, down))
    return runs, hops


def _hop_ms(model: ModelDims, hop: HopRun, rows: int) -> float:
    up = hop.link.send_ms(hop.src, message_bytes(model, hop.codec, hop.up, rows))
    return up + hop.link.send_ms(hop.dst, message_bytes(model, hop.codec, hop.down, rows))


def decode_ms(instance: Instance, plan: Plan) -> float:
    """ms per generated token (batch 1): sum of `stage_decode_ms` over the stages (the device's head stage
    included) + per hop, up message (one row) + down message, each fixed_ms + bytes * ms_per_byte."""
    return _decode(instance, *layout(instance, plan))


def _decode(instance: Instance, runs: list[StageRun], hops: list[HopRun]) -> float:
    return sum(stage_decode_ms(r) for r in runs) + sum(_hop_ms(instance.model, h, 1) for h in hops)


def ttft_ms(instance: Instance, plan: Plan) -> float:
    """ms to the first token of a P-token prompt: sum of `stage_prefill_ms` + per hop, the up message with P rows
    (hidden or token ids) + the down message (P rows of hidden, or one token id)."""
    return _ttft(instance, *layout(instance, plan))


def _ttft(instance: Instance, runs: list[StageRun], hops: list[HopRun]) -> float:
    rows = instance.prompt_tokens
    return sum(stage_prefill_ms(r, rows) for r in runs) + sum(_hop_ms(instance.model, h, rows) for h in hops)


def memory_bytes(instance: Instance, plan: Plan) -> dict[str, int]:
    """Bytes per participating node (`stage_memory_bytes`); a thin-client device holds only its base_bytes."""
    return _memory(instance, layout(instance, plan)[0])


def _memory(instance: Instance, runs: list[StageRun]) -> dict[str, int]:
    out = {r.node.name: stage_memory_bytes(instance.model, r, instance.sessions) for r in runs}
    if instance.device.name not in out:
        out = {instance.device.name: instance.device.base_bytes, **out}
    return out


def ppl_increase_pct(instance: Instance, plan: Plan) -> float:
    """Additive model: a scheme's whole-model increase is shared by the L layers, the embedding and the head, a
    (L + 2)-th each: sum over stages of (layers [+ 1 with the embedding] [+ 1 with the head]) * ppl(scheme) /
    (L + 2), plus ppl(codec) once per hop carrying hidden states (either way); a token-only hop adds nothing."""
    return _ppl(instance, *layout(instance, plan))


def stage_ppl_share(num_layers: int, embeds: bool, holds_head: bool, model_layers: int) -> float:
    """The fraction of a scheme's whole-model ppl increase a stage carries (see `ppl_increase_pct`)."""
    return (num_layers + int(embeds) + int(holds_head)) / (model_layers + 2)


def _ppl(instance: Instance, runs: list[StageRun], hops: list[HopRun]) -> float:
    L = instance.model.num_layers
    parts = sum(stage_ppl_share(r.num_layers, r.embeds, r.holds_head, L) * r.scheme.ppl_increase_pct for r in runs)
    return parts + sum(h.codec.ppl_increase_pct for h in hops if h.carries_hidden)


def bottleneck_ms(instance: Instance, plan: Plan) -> float:
    """The busiest resource's time per token: each node's compute (`stage_decode_ms`, all its stages) and each
    link direction's serialization (bytes * ms_per_byte: fixed latency does not occupy the link)."""
    return _bottleneck(instance, *layout(instance, plan))


def _bottleneck(instance: Instance, runs: list[StageRun], hops: list[HopRun]) -> float:
    busy = [stage_decode_ms(r) for r in runs]
    per_direction: dict[tuple[str, str], float] = defaultdict(float)
    for hop in hops:
        for src, dst, kind in ((hop.src, hop.dst, hop.up), (hop.dst, hop.src, hop.down)):
            per_direction[src, dst] += message_bytes(instance.model, hop.codec, kind, 1) * hop.link.line_from(src)[1]
    return max(busy + list(per_direction.values()))


def throughput_tok_s(instance: Instance, plan: Plan) -> float:
    """Tokens/s of N = sessions concurrent sessions with the stages pipelined:
    min(N * 1000 / decode_ms, 1000 / bottleneck_ms) (inf when both are 0)."""
    runs, hops = layout(instance, plan)
    return throughput_from(instance.sessions, _decode(instance, runs, hops), _bottleneck(instance, runs, hops))


def throughput_from(sessions: int, decode: float, bottleneck: float) -> float:
    """min(N * 1000 / decode_ms, 1000 / bottleneck_ms) = 1000 / max(decode_ms / N, bottleneck_ms)."""
    cycle_ms = max(decode / sessions, bottleneck)
    return math.inf if cycle_ms <= 0 else 1000.0 / cycle_ms


def evaluate(instance: Instance, plan: Plan) -> PlanCost:
    """Every cost of a plan.

    Raises:
        ConfigError: the plan does not fit the instance.
    """
    runs, hops = layout(instance, plan)
    decode = _decode(instance, runs, hops)
    throughput = throughput_from(instance.sessions, decode, _bottleneck(instance, runs, hops))
    return PlanCost(
        decode, _ttft(instance, runs, hops), throughput, _memory(instance, runs), _ppl(instance, runs, hops)
    )


def violations(instance: Instance, cost: PlanCost, max_ppl_increase_pct: float = math.inf) -> list[str]:
    """The constraints a costed plan breaks: "memory of 'x': ..." per node over budget, "ppl increase: ..."."""
    out = []
    for name, used in cost.memory_bytes.items():
        node = instance.node(name)
        assert node is not None
        if node.memory_bytes is not None and used > node.memory_bytes:
            out.append(f"memory of {name!r}: {used} bytes > budget {node.memory_bytes}")
    if cost.ppl_increase_pct > max_ppl_increase_pct:
        out.append(f"ppl increase: +{cost.ppl_increase_pct:.4g}% > max {max_ppl_increase_pct:.4g}%")
    return out


def check(
    instance: Instance, plan: Plan, max_ppl_increase_pct: float = math.inf, device_first: bool = True
) -> list[str]:
    """Every constraint the plan violates: structural problems (then nothing else), memory over a node's budget,
    ppl increase over the maximum. Empty: the plan is valid."""
    found = problems(instance, plan, device_first)
    if found:
        return found
    return violations(instance, evaluate(instance, plan), max_ppl_increase_pct)


def objective_key(cost: PlanCost, objective: str) -> tuple[float, float]:
    """What an objective minimizes, lexicographically: latency (decode, ttft); ttft (ttft, decode);
    throughput (-throughput, decode)."""
    if objective == "latency":
        return cost.decode_ms, cost.ttft_ms
    if objective == "ttft":
        return cost.ttft_ms, cost.decode_ms
    if objective == "throughput":
        return -cost.throughput_tok_s, cost.decode_ms
    raise ConfigError(f"unknown objective {objective!r}; choose from ['latency', 'throughput', 'ttft']")
