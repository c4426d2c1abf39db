"""The optimizer's leaves: every (node, scheme, layer count) stage and every (link, codec) hop, as labels.

Costs come from `edgellm.plan.cost`'s own per-stage and per-message formulas, so the programs and the cost
model cannot disagree (beyond floating-point summation order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from edgellm.plan.cost import HIDDEN, StageRun, message_bytes, stage_decode_ms, stage_memory_bytes, stage_prefill_ms
from edgellm.plan.instance import Instance, NodeCaps
from edgellm.plan.labels import Label, Table, pareto

METRICS = ("decode", "ttft", "ppl")


@dataclass(frozen=True)
class Criteria:
    """What a search minimizes and respects.

    Attributes:
        primary, secondary: metrics of `METRICS`, minimized lexicographically.
        cap: the ppl cap; inf ignores ppl (each label set then holds one label).
        memory: respect each node's memory budget.
        limit_ms: every resource's busy time per token (node compute, link serialization) must be <= this.
        ppl_weight: lambda of a Lagrangian search: the primary cost is primary + lambda * ppl.
    """

    primary: str
    secondary: str
    cap: float = math.inf
    memory: bool = True
    limit_ms: float = math.inf
    ppl_weight: float = 0.0

    @property
    def scalar(self) -> bool:
        return math.isinf(self.cap)


@dataclass(frozen=True)
class StageKind:
    """The role of a node's stage: embeds (first stage), holds the head, the head as a separate stage."""

    embeds: bool
    holds_head: bool
    separate_head: bool = False


class Options:
    """Builds (and caches) the labels of stage and hop options of one instance under one `Criteria`.

    `busy_ms` collects the busy time of every option built: the candidate bottlenecks of the throughput search.
    """

    def __init__(self, instance: Instance, criteria: Criteria) -> None:
        self.instance = instance
        self.criteria = criteria
        self.busy_ms: set[float] = set()
        self._primary = METRICS.index(criteria.primary)
        self._secondary = METRICS.index(criteria.secondary)
        self._stages: dict[tuple[str, StageKind, int], Table] = {}
        self._hops: dict[tuple[str, str, str, str, str], list[Label]] = {}

    def _label(self, decode: float, ttft: float, ppl: float, back: object) -> Label:
        metrics = (decode, ttft, ppl)
        primary = (
            metrics[self._primary] + self.criteria.ppl_weight * ppl
            if self.criteria.ppl_weight
            else metrics[self._primary]
        )
        return primary, metrics[self._secondary], 0.0 if self.criteria.scalar else ppl, back

    def stage_table(self, node: NodeCaps, kind: StageKind, min_layers: int) -> Table:
        """Index n: the label set of `node` running n layers in role `kind` at any of its schemes (empty below
        `min_layers`, or where no scheme fits the memory budget or the busy limit)."""
        key = (node.name, kind, min_layers)
        if key not in self._stages:
            self._stages[key] = self._build_stage_table(node, kind, min_layers)
        return self._stages[key]

    def _build_stage_table(self, node: NodeCaps, kind: StageKind, min_layers: int) -> Table:
        instance, crit = self.instance, self.criteria
        model, prompt = instance.model, instance.prompt_tokens
        num_layers = model.num_layers
        budget = node.memory_bytes if crit.memory else None
        table: Table = [[] for _ in range(num_layers + 1)]
        for scheme in node.schemes:
            run = StageRun(node, scheme, 0, kind.embeds, kind.holds_head, kind.separate_head)
            decode0, ttft0 = stage_decode_ms(run), stage_prefill_ms(run, prompt)
            memory0 = stage_memory_bytes(model, run, instance.sessions)
            memory_per_layer = (
                scheme.layer_bytes + node.kv_bytes_per_token_per_layer * model.max_context * instance.sessions
            )
            ttft_per_layer = prompt * scheme.layer_prefill_ms_per_token
            ppl_per_layer = scheme.ppl_increase_pct / (num_layers + 2)  # cost.stage_ppl_share
            ppl0 = (int(kind.embeds) + int(kind.holds_head)) * ppl_per_layer
            for n in range(min_layers, num_layers + 1):
                if budget is not None and memory0 + n * memory_per_layer > budget:
                    break
                decode = decode0 + n * scheme.layer_decode_ms
                if decode > crit.limit_ms:
                    break
                self.busy_ms.add(decode)
                back = ("s", node.name, scheme.name, n)
                table[n].append(self._label(decode, ttft0 + n * ttft_per_layer, ppl0 + n * ppl_per_layer, back))
        return [pareto(labels) if len(labels) > 1 else labels for labels in table]

    def hop(self, src: str, dst: str, kinds: tuple[str, str], tag: str = "h") -> list[Label]:
        """The label set of a hop src -> dst (src nearer the device) whose messages are `kinds` (up, down), at any
        codec; empty without a link or when no codec fits the busy limit. Leaves are (tag, dst, codec)."""
        key = (src, dst, kinds[0], kinds[1], tag)
        if key not in self._hops:
            self._hops[key] = self._build_hop(src, dst, kinds, tag)
        return self._hops[key]

    def _build_hop(self, src: str, dst: str, kinds: tuple[str, str], tag: str) -> list[Label]:
        instance = self.instance
        link = instance.link(src, dst)
        if link is None:
            return []
        model, prompt = instance.model, instance.prompt_tokens
        up, down = kinds
        up_per_byte, down_per_byte = link.line_from(src)[1], link.line_from(dst)[1]
        labels = []
        for codec in instance.codecs:
            up_bytes, down_bytes = message_bytes(model, codec, up, 1), message_bytes(model, codec, down, 1)
            busy = max(up_bytes * up_per_byte, down_bytes * down_per_byte)
            if busy > self.criteria.limit_ms:
                continue
            self.busy_ms.add(busy)
            decode = link.send_ms(src, up_bytes) + link.send_ms(dst, down_bytes)
            ttft = link.send_ms(src, message_bytes(model, codec, up, prompt)) + link.send_ms(
                dst, message_bytes(model, codec, down, prompt)
            )
            ppl = codec.ppl_increase_pct if HIDDEN in kinds else 0.0
            labels.append(self._label(decode, ttft, ppl, (tag, dst, codec.name)))
        return pareto(labels)
