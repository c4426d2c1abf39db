"""A plan: which node runs which layers at which weight scheme, the codec of every hop, and where the head runs.

Shapes a `Plan` checks by itself (stages contiguous from layer 0, a codec per hop); what needs the instance
(the layer count, nodes, links, schemes, codecs, budgets) is `edgellm.plan.cost.check`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from edgellm.errors import ConfigError
from edgellm.plan.fields import fields_of, list_of, require_choice, require_int, require_name
from edgellm.plan.instance import MODES

Objective = Literal["latency", "ttft", "throughput"]
OBJECTIVES: tuple[str, ...] = ("latency", "ttft", "throughput")
HEADS = ("device", "server")


@dataclass(frozen=True)
class StageAssign:
    """Layers [start, end) on `node` at weight scheme `scheme` (the device's stage may be empty: embedding only)."""

    node: str
    start: int
    end: int
    scheme: str

    def __post_init__(self) -> None:
        require_name("stage", "node", self.node)
        require_int(f"stage on {self.node!r}", "start", self.start)
        require_int(f"stage on {self.node!r}", "end", self.end, self.start)
        require_name(f"stage on {self.node!r}", "scheme", self.scheme)

    @property
    def num_layers(self) -> int:
        return self.end - self.start

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: object) -> StageAssign:
        """Raises ConfigError on an unknown, missing or ill-typed field."""
        return cls(**fields_of("stage", data, ("node", "start", "end", "scheme")))


@dataclass(frozen=True)
class Plan:
    """A placement of the model on an ordered chain of nodes.

    Attributes:
        stages: in execution order, contiguous from layer 0. When stages[0] is not on the device, the device is a
            thin client: it holds nothing and sends token ids to stages[0]'s node, which embeds.
        codecs: the codec of each hop. Chain: hop i joins consecutive nodes of [device (thin client only)] +
            stage nodes; star: hop i joins the device and the (i+1)-th server. So there is one codec per server
            stage; the codec of a hop that carries only token ids costs nothing and changes nothing.
        head: "device" (a separate head-only stage the device runs last) or "server" (on the last stage's node).
        mode: "chain" or "star".
    """

    stages: tuple[StageAssign, ...]
    codecs: tuple[str, ...]
    head: str
    mode: str

    def __post_init__(self) -> None:
        if not self.stages or not all(isinstance(s, StageAssign) for s in self.stages):
            raise ConfigError("a plan needs at least one StageAssign")
        if self.stages[0].start != 0:
            raise ConfigError(f"the first stage must start at layer 0, got {self.stages[0].start}")
        for prev, nxt in zip(self.stages, self.stages[1:]):
            if nxt.start != prev.end:
                raise ConfigError(
                    f"stage on {nxt.node!r} starts at {nxt.start}, not where {prev.node!r} ends ({prev.end})"
                )
        if not all(isinstance(c, str) and c for c in self.codecs):
            raise ConfigError(f"plan codecs must be non-empty names, got {list(self.codecs)}")
        if len(self.codecs) not in (len(self.stages) - 1, len(self.stages)):
            raise ConfigError(
                f"a plan of {len(self.stages)} stages has {len(self.stages) - 1} or {len(self.stages)} hops, got {len(self.codecs)} codecs"
            )
        require_choice("plan", "head", self.head, HEADS)
        require_choice("plan", "mode", self.mode, MODES)

    @property
    def cuts(self) -> tuple[int, ...]:
        """The first layer of each stage after the first (what a topology's `cuts` lists)."""
        return tuple(s.start for s in self.stages[1:])

    @property
    def num_layers(self) -> int:
        return self.stages[-1].end

    def to_json(self) -> dict[str, Any]:
        return {
            "stages": [s.to_json() for s in self.stages],
            "codecs": list(self.codecs),
            "head": self.head,
            "mode": self.mode,
        }

    @classmethod
    def from_json(cls, data: object) -> Plan:
        """Raises ConfigError on an unknown, missing or ill-typed field."""
        values = fields_of("plan", data, ("stages", "codecs", "head", "mode"))
        stages = tuple(StageAssign.from_json(s) for s in list_of("plan", "stages", values["stages"]))
        return cls(stages, tuple(list_of("plan", "codecs", values["codecs"])), values["head"], values["mode"])
