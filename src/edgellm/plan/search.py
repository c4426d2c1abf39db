"""The exact min-cost search over plans, for one `Criteria` (an additive objective, constraints, a busy limit).

A plan's cost splits into stage terms, which depend on a node, its role, scheme and layer count but not on the
order of the servers, and hop terms, which depend on the order but not on the layers. So for each root (the
device, or the first server of a thin client), mode and head side:

- paths: a Held-Karp program over (visited servers, last server) gives the cheapest hops of every path;
- layers: a subset knapsack `alloc(T)[m]` gives the cheapest way for the servers in T to hold m layers in the
  middle of the chain (each >= 1 layer, scheme chosen per node, memory checked per node and layer count);
- the root's stage and the last server's stage (it may hold the head) join by min-plus convolution.

The best plan is the cheapest path + allocation + root stage over every (servers, last server). Each value is a
Pareto label set (see `edgellm.plan.labels`), so the ppl cap is handled exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from edgellm.plan.cost import hop_kinds
from edgellm.plan.instance import Instance, NodeCaps
from edgellm.plan.labels import ZERO, Label, Table, best, convolve, leaves, pareto, plus, sums
from edgellm.plan.options import Criteria, Options, StageKind
from edgellm.plan.placement import Plan, StageAssign


@dataclass(frozen=True)
class Space:
    """The plans searched: modes, head sides, and whether the device must run stage 0 (else thin clients too)."""

    modes: tuple[str, ...]
    heads: tuple[str, ...]
    device_first: bool = True


@dataclass(frozen=True)
class Problem:
    """One rooted program: a mode, a head side, and the root (None: the device; else the index of the server a
    thin client sends its tokens to)."""

    mode: str
    head: str
    thin_root: int | None


@dataclass(frozen=True)
class Parts:
    """A rooted program's pieces: the root-only plans (complete), the label set of the root's own hop (thin
    client; else [ZERO]), the paths (visited mask, last server) -> hop labels, and per last server u the table
    of the root's and u's stages holding j layers together."""

    root_only: list[Label]
    hop_more: list[Label]
    paths: dict[tuple[int, int], list[Label]]
    joined: dict[int, Table]


@dataclass(frozen=True)
class Found:
    """The cheapest label of a search and the program that found it."""

    label: Label
    problem: Problem


class Pruner(Protocol):
    """Bounds that drop labels no completion of which can be optimal (see `edgellm.plan.bounds`): a label of
    cost c and ppl p is kept only if c + weight * p <= room[m] (None: no completion at all)."""

    weight: float

    def alloc_room(self, mask: int) -> list[float] | None: ...

    def joined_room(self, problem: Problem, u: int) -> list[float] | None: ...


class Search:
    """Exact min-cost plans of one instance under one `Criteria`; tables are shared across programs."""

    def __init__(self, instance: Instance, criteria: Criteria, pruner: Pruner | None = None) -> None:
        self.instance = instance
        self.criteria = criteria
        self.pruner = pruner
        self.options = Options(instance, criteria)
        self.servers = instance.nodes[1:]
        self.mid = [self.options.stage_table(s, StageKind(False, False), 1) for s in self.servers]
        zero_table: Table = [[] for _ in range(instance.model.num_layers + 1)]
        zero_table[0] = [ZERO]
        self._alloc: dict[int, Table] = {0: zero_table}
        self._parts: dict[Problem, Parts | None] = {}

    def alloc(self, mask: int) -> Table:
        """Index m: the label set of the servers in `mask` holding m layers between the root and the last server."""
        if mask not in self._alloc:
            low = (mask & -mask).bit_length() - 1
            rest = self.alloc(mask & (mask - 1))
            num_layers = self.instance.model.num_layers
            bound = (
                None if self.pruner is None else _bound(self.pruner.weight, self.pruner.alloc_room(mask), num_layers)
            )
            out = convolve(self.mid[low], rest, range(num_layers + 1), self.criteria.cap, self.criteria.scalar, bound)
            self._alloc[mask] = [out[m] for m in range(num_layers + 1)]
        return self._alloc[mask]

    def allocated(self) -> list[int]:
        """The masks whose `alloc` table is built."""
        return list(self._alloc)

    def problems(self, space: Space) -> list[Problem]:
        """Every rooted program of the space (a thin client holds no head)."""
        roots: list[int | None] = [None] if space.device_first else [None, *range(len(self.servers))]
        heads = [(mode, head) for mode in space.modes for head in space.heads]
        return [Problem(mode, head, root) for mode, head in heads for root in roots if root is None or head == "server"]

    def best(self, space: Space) -> Found | None:
        """The cheapest feasible label over the space, or None."""
        found: Found | None = None
        cap, scalar, num_layers = self.criteria.cap, self.criteria.scalar, self.instance.model.num_layers
        for problem in self.problems(space):
            parts = self.parts(problem)
            if parts is None:
                continue
            candidates = list(parts.root_only)
            for (mask, u), path in parts.paths.items():
                middle = self.alloc(mask & ~(1 << u))
                layers = convolve(parts.joined[u], middle, [num_layers], cap, scalar)[num_layers]
                if layers:
                    candidates += sums(sums(path, layers, cap), parts.hop_more, cap)
            label = best(candidates, cap)
            if label is not None and (found is None or label[:3] < found.label[:3]):
                found = Found(label, problem)
        return found

    def parts(self, problem: Problem) -> Parts | None:
        """The pieces of a rooted program (None: its root cannot run)."""
        if problem not in self._parts:
            self._parts[problem] = self._build_parts(problem)
        return self._parts[problem]

    def _build_parts(self, problem: Problem) -> Parts | None:
        instance, crit, options = self.instance, self.criteria, self.options
        num_layers, device, mode, head = instance.model.num_layers, instance.device, problem.mode, problem.head
        if problem.thin_root is None:
            root: NodeCaps = device
            kind = StageKind(True, head == "device", head == "device")
            root_first = options.stage_table(device, kind, 0)
            root_only = root_first[num_layers] if head == "device" else []
            hop_more = hop_only = [ZERO]
            allowed = (1 << len(self.servers)) - 1
        else:
            if crit.memory and device.memory_bytes is not None and device.base_bytes > device.memory_bytes:
                return None
            root = self.servers[problem.thin_root]
            root_first = options.stage_table(root, StageKind(True, False), 1)
            root_only = options.stage_table(root, StageKind(True, True), 1)[num_layers]
            hop_more = options.hop(device.name, root.name, hop_kinds(mode, head, True, 0, 2), "r")
            hop_only = options.hop(device.name, root.name, hop_kinds(mode, head, True, 0, 1), "r")
            if not hop_more and not hop_only:  # the device cannot reach this root
                return None
            allowed = ((1 << len(self.servers)) - 1) & ~(1 << problem.thin_root)
        paths = self._paths(mode, head, root, allowed)
        last_kind = StageKind(False, head == "server")
        joined: dict[int, Table] = {}
        for u in sorted({u for _, u in paths}):
            last = options.stage_table(self.servers[u], last_kind, 1)
            room = None if self.pruner is None else self.pruner.joined_room(problem, u)
            bound = None if self.pruner is None else _bound(self.pruner.weight, room, num_layers)
            out = convolve(root_first, last, range(num_layers + 1), crit.cap, crit.scalar, bound)
            joined[u] = [out[j] for j in range(num_layers + 1)]
        return Parts(sums(root_only, hop_only, crit.cap) if root_only else [], hop_more, paths, joined)

    def _paths(self, mode: str, head: str, root: NodeCaps, allowed: int) -> dict[tuple[int, int], list[Label]]:
        """(servers visited, last server) -> label set of the hops of the paths from the root through them (the
        last hop's messages as a last hop's)."""
        cap, options, servers = self.criteria.cap, self.options, self.servers
        mid_kinds, last_kinds = hop_kinds(mode, head, False, 0, 2), hop_kinds(mode, head, False, 1, 2)
        device = self.instance.device.name

        def sender(node: NodeCaps) -> str:
            return node.name if mode == "chain" else device

        bits = [v for v in range(len(servers)) if allowed >> v & 1]
        paths: dict[int, dict[int, list[Label]]] = {}
        for v in bits:
            first = options.hop(sender(root), servers[v].name, mid_kinds)
            if first:
                paths[1 << v] = {v: first}
        for mask in range(1, allowed + 1):
            ends = paths.get(mask)
            if ends is None:
                continue
            if mask & (mask - 1):  # grown from smaller paths: keep the non-dominated
                for u in ends:
                    ends[u] = pareto(ends[u])
            for u, labels in ends.items():
                for v in bits:
                    if mask >> v & 1:
                        continue
                    hop = options.hop(sender(servers[u]), servers[v].name, mid_kinds)
                    if hop:
                        grown = paths.setdefault(mask | 1 << v, {}).setdefault(v, [])
                        grown += [plus(x, y) for x in labels for y in hop if x[2] + y[2] <= cap]
        if last_kinds == mid_kinds:
            return {(mask, u): labels for mask, ends in paths.items() for u, labels in ends.items()}
        out: dict[tuple[int, int], list[Label]] = {}
        for mask, ends in paths.items():
            for u in ends:
                rest = mask & ~(1 << u)
                if rest == 0:
                    labels = options.hop(sender(root), servers[u].name, last_kinds)
                else:
                    hops = [(w, options.hop(sender(servers[w]), servers[u].name, last_kinds)) for w in paths[rest]]
                    labels = pareto(
                        [plus(x, y) for w, hop in hops for x in paths[rest][w] for y in hop if x[2] + y[2] <= cap]
                    )
                if labels:
                    out[mask, u] = labels
        return out

    def plan(self, found: Found) -> Plan:
        """The plan a found label describes."""
        device, problem = self.instance.device.name, found.problem
        root = device if problem.thin_root is None else self.servers[problem.thin_root].name
        stages: dict[str, tuple[str, int]] = {}
        path: list[tuple[str, str]] = []
        root_codec: list[str] = []
        for leaf in leaves(found.label):
            if leaf[0] == "s":
                stages[leaf[1]] = (leaf[2], leaf[3])
            elif leaf[0] == "h":
                path.append((leaf[1], leaf[2]))
            else:
                root_codec.append(leaf[2])
        assigned, start = [], 0
        for name in [root] + [dst for dst, _ in path]:
            scheme, n = stages[name]
            assigned.append(StageAssign(name, start, start + n, scheme))
            start += n
        return Plan(tuple(assigned), tuple(root_codec + [c for _, c in path]), problem.head, problem.mode)


def _bound(weight: float, room: list[float] | None, num_layers: int) -> tuple[float, list[float]]:
    return weight, [-math.inf] * (num_layers + 1) if room is None else room
