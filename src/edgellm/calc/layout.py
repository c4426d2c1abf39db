"""What each node of a split holds: its layers, and whether it has the embedding and the head.

The stages follow `edgellm.model.stage.chain_stages` exactly (tests/test_calc.py compares them for every cut set of
a small model); it is mirrored here because that module imports torch, and a calculator should not need it.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgellm.calc.config import Split
from edgellm.errors import ConfigError


@dataclass(frozen=True)
class Holding:
    """One node's part of the model: decoder layers `[start, end)` (empty when start == end), embed, head."""

    node: str
    start: int
    end: int
    embed: bool
    head: bool

    @property
    def num_layers(self) -> int:
        return self.end - self.start


def chain_layout(
    num_layers: int, cuts: tuple[int, ...], device: str, servers: tuple[str, ...], head: str
) -> list[tuple[str, Holding]]:
    """The stages in execution order with their nodes, as `chain_stages(num_layers, cuts, device, servers, head)`.

    A first cut of 0 gives the device no layer (then the first server embeds). With `head="device"` a final
    head-only stage goes to the device, else the last stage holds the head.

    Raises:
        ConfigError: one cut per server is not given, or cuts out of range, unsorted or repeated.
    """
    if len(cuts) != len(servers):
        raise ConfigError(f"{len(cuts)} cut(s) for {len(servers)} server(s); need one per server")
    zero = bool(cuts) and cuts[0] == 0
    owners = list(servers) if zero else [device, *servers]
    inner = cuts[1:] if zero else cuts
    for c in inner:
        if not 0 < c < num_layers:
            raise ConfigError(f"cut {c} is out of range: cuts must lie in 1..{num_layers - 1} for {num_layers} layers")
    if list(inner) != sorted(set(inner)):
        raise ConfigError(f"cuts must be strictly increasing without duplicates, got {list(inner)}")
    bounds = [0, *inner, num_layers]
    stages = [(owner, Holding(owner, a, b, a == 0, False)) for owner, a, b in zip(owners, bounds, bounds[1:])]
    if head == "device":
        stages.append((device, Holding(device, num_layers, num_layers, False, True)))
    else:
        owner, last = stages[-1]
        stages[-1] = (owner, Holding(owner, last.start, last.end, last.embed, True))
    return stages


def node_holdings(num_layers: int, split: Split) -> tuple[Holding, ...]:
    """Each node's holding, in the order of `split.node_names` (a node that holds nothing has an empty one).

    Raises:
        ConfigError: cuts that do not fit `num_layers` (out of range, unsorted or repeated).
    """
    names = split.node_names
    parts: dict[str, list[Holding]] = {}
    for owner, part in chain_layout(num_layers, split.cuts, names[0], names[1:], split.head):
        parts.setdefault(owner, []).append(part)  # the device may run two: its layers, then the head alone
    holdings = []
    for name in names:
        own = parts.get(name, [])
        layered = [p for p in own if p.num_layers]  # at most one: stages cover disjoint ranges, one node each
        start, end = (layered[0].start, layered[0].end) if layered else (0, 0)
        holdings.append(Holding(name, start, end, any(p.embed for p in own), any(p.head for p in own)))
    return tuple(holdings)
