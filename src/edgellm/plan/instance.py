"""What the optimizer plans over: the model's dimensions and every node's, link's and codec's measured costs.

Every value is an input (a profile, a topology's emulation, a user's budget); none is a hidden constant. Each
dataclass is frozen, checked in `__post_init__`, and round-trips through plain JSON objects (`to_json` /
`from_json`) so profiles and benchmarks can record it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from edgellm.errors import ConfigError
from edgellm.plan.fields import (
    fields_of,
    list_of,
    require_choice,
    require_int,
    require_name,
    require_number,
    require_unique,
)

ROLES = ("device", "edge", "cloud")
MODES = ("chain", "star")


@dataclass(frozen=True)
class SchemeCost:
    """One weight scheme (fp16, int8, int4-g32, ...) on one node.

    Times are measured on the node and already multiplied by its emulated compute slowdown.

    Attributes:
        name: the scheme's name.
        layer_decode_ms: one decoder layer, one token (batch 1).
        layer_prefill_ms_per_token: one decoder layer, per prompt token.
        layer_bytes: weights of one decoder layer.
        embed_bytes, head_bytes: the token embedding; the final norm + LM head.
        head_decode_ms: the head on one position (also what the prompt's last position costs).
        embed_decode_ms: the embedding lookup of one call.
        ppl_increase_pct: the whole model's perplexity increase (%) with every layer at this scheme (>= 0).
    """

    name: str
    layer_decode_ms: float
    layer_prefill_ms_per_token: float
    layer_bytes: int
    embed_bytes: int
    head_bytes: int
    head_decode_ms: float
    embed_decode_ms: float = 0.0
    ppl_increase_pct: float = 0.0

    def __post_init__(self) -> None:
        require_name("scheme", "name", self.name)
        for name in ("layer_decode_ms", "layer_prefill_ms_per_token", "head_decode_ms", "embed_decode_ms"):
            require_number(f"scheme {self.name!r}", name, getattr(self, name))
        for name in ("layer_bytes", "embed_bytes", "head_bytes"):
            require_int(f"scheme {self.name!r}", name, getattr(self, name))
        # >= 0 keeps the optimizer's pruning of partial ppl sums exact; a profiler clamps a measured gain to 0.
        require_number(f"scheme {self.name!r}", "ppl_increase_pct", self.ppl_increase_pct)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: object) -> SchemeCost:
        """Raises ConfigError on an unknown, missing or ill-typed field."""
        names = ("name", "layer_decode_ms", "layer_prefill_ms_per_token", "layer_bytes", "embed_bytes")
        return cls(**fields_of("scheme", data, (*names, "head_bytes", "head_decode_ms"), _SCHEME_OPTIONAL))


_SCHEME_OPTIONAL = ("embed_decode_ms", "ppl_increase_pct")


@dataclass(frozen=True)
class NodeCaps:
    """A node's capabilities: its schemes' costs, its memory budget and fixed costs.

    Attributes:
        name: the node's name in the topology.
        role: one of `ROLES`; only the instance's first node is the device.
        schemes: the weight schemes it can run, names unique.
        memory_bytes: its budget; None is unlimited.
        base_bytes: an idle node process (runtime, buffers).
        stage_overhead_ms: the fixed cost of one stage call (decode), whatever its layers.
        activation_bytes: working memory of running a stage.
        kv_bytes_per_token_per_layer: KV cache of one token of context in one layer.
    """

    name: str
    role: str
    schemes: tuple[SchemeCost, ...]
    memory_bytes: int | None
    base_bytes: int
    stage_overhead_ms: float
    activation_bytes: int = 0
    kv_bytes_per_token_per_layer: int = 0

    def __post_init__(self) -> None:
        require_name("node", "name", self.name)
        owner = f"node {self.name!r}"
        require_choice(owner, "role", self.role, ROLES)
        if not self.schemes or not all(isinstance(s, SchemeCost) for s in self.schemes):
            raise ConfigError(f"{owner} needs at least one SchemeCost")
        require_unique(f"{owner} scheme", [s.name for s in self.schemes])
        if self.memory_bytes is not None:
            require_int(owner, "memory_bytes", self.memory_bytes)
        require_int(owner, "base_bytes", self.base_bytes)
        require_number(owner, "stage_overhead_ms", self.stage_overhead_ms)
        require_int(owner, "activation_bytes", self.activation_bytes)
        require_int(owner, "kv_bytes_per_token_per_layer", self.kv_bytes_per_token_per_layer)

    def scheme(self, name: str) -> SchemeCost | None:
        """The scheme called `name`, or None."""
        return next((s for s in self.schemes if s.name == name), None)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "schemes": [s.to_json() for s in self.schemes]}

    @classmethod
    def from_json(cls, data: object) -> NodeCaps:
        """Raises ConfigError on an unknown, missing or ill-typed field."""
        required = ("name", "role", "schemes", "memory_bytes", "base_bytes", "stage_overhead_ms")
        values = fields_of("node", data, required, ("activation_bytes", "kv_bytes_per_token_per_layer"))
        values["schemes"] = tuple(SchemeCost.from_json(s) for s in list_of("node", "schemes", values["schemes"]))
        return cls(**values)


@dataclass(frozen=True)
class LinkCaps:
    """A link's fitted cost per message, one line per direction: ms = fixed + bytes * per_byte.

    `a` is the end nearer the device (the caller orders them): "up" is a -> b, "down" b -> a.
    """

    a: str
    b: str
    up_fixed_ms: float
    up_ms_per_byte: float
    down_fixed_ms: float
    down_ms_per_byte: float

    def __post_init__(self) -> None:
        require_name("link", "a", self.a)
        require_name("link", "b", self.b)
        if self.a == self.b:
            raise ConfigError(f"link {self.a!r} <-> {self.b!r} joins a node to itself")
        for name in ("up_fixed_ms", "up_ms_per_byte", "down_fixed_ms", "down_ms_per_byte"):
            require_number(f"link {self.name}", name, getattr(self, name))

    @property
    def name(self) -> str:
        return f"{self.a}<->{self.b}"

    def joins(self, x: str, y: str) -> bool:
        """Whether this link joins x and y (either order)."""
        return {x, y} == {self.a, self.b}

    def line_from(self, src: str) -> tuple[float, float]:
        """(fixed_ms, ms_per_byte) of a message sent by `src` across this link."""
        if src == self.a:
            return self.up_fixed_ms, self.up_ms_per_byte
        if src == self.b:
            return self.down_fixed_ms, self.down_ms_per_byte
        raise ConfigError(f"node {src!r} is not an end of link {self.name}")

    def send_ms(self, src: str, nbytes: float) -> float:
        """Time of one message of `nbytes` sent by `src`: fixed + bytes * per_byte."""
        fixed_ms, ms_per_byte = self.line_from(src)
        return fixed_ms + nbytes * ms_per_byte

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: object) -> LinkCaps:
        """Raises ConfigError on an unknown, missing or ill-typed field."""
        names = ("a", "b", "up_fixed_ms", "up_ms_per_byte", "down_fixed_ms", "down_ms_per_byte")
        return cls(**fields_of("link", data, names))


@dataclass(frozen=True)
class CodecCost:
    """A hidden-state codec: bytes_per_value per element plus bytes_per_row (scales) per token row."""

    name: str
    bytes_per_value: float
    bytes_per_row: int = 0
    ppl_increase_pct: float = 0.0

    def __post_init__(self) -> None:
        require_name("codec", "name", self.name)
        require_number(f"codec {self.name!r}", "bytes_per_value", self.bytes_per_value)
        if not self.bytes_per_value > 0:
            raise ConfigError(f"codec {self.name!r} bytes_per_value must be > 0, got {self.bytes_per_value}")
        require_int(f"codec {self.name!r}", "bytes_per_row", self.bytes_per_row)
        require_number(f"codec {self.name!r}", "ppl_increase_pct", self.ppl_increase_pct)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: object) -> CodecCost:
        """Raises ConfigError on an unknown, missing or ill-typed field."""
        return cls(**fields_of("codec", data, ("name", "bytes_per_value"), ("bytes_per_row", "ppl_increase_pct")))


@dataclass(frozen=True)
class ModelDims:
    """The model's shape as far as placement cares.

    Attributes:
        num_layers: decoder layers L.
        hidden_size: values per hidden-state row.
        max_context: tokens of context each session's KV cache is sized for.
        header_bytes: the fixed part of every message.
        token_bytes: one token id on the wire.
        tied_embeddings: the embedding and LM head share weights (held once on a node holding both).
    """

    num_layers: int
    hidden_size: int
    max_context: int
    header_bytes: int = 64
    token_bytes: int = 8
    tied_embeddings: bool = True

    def __post_init__(self) -> None:
        require_int("model", "num_layers", self.num_layers, 1)
        require_int("model", "hidden_size", self.hidden_size, 1)
        require_int("model", "max_context", self.max_context, 1)
        require_int("model", "header_bytes", self.header_bytes)
        require_int("model", "token_bytes", self.token_bytes, 1)
        if not isinstance(self.tied_embeddings, bool):
            raise ConfigError(f"model tied_embeddings must be a bool, got {self.tied_embeddings!r}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: object) -> ModelDims:
        """Raises ConfigError on an unknown, missing or ill-typed field."""
        optional = ("header_bytes", "token_bytes", "tied_embeddings")
        return cls(**fields_of("model", data, ("num_layers", "hidden_size", "max_context"), optional))


@dataclass(frozen=True)
class Instance:
    """One planning problem: a model, the nodes (nodes[0] is the device), their links and the codecs.

    Attributes:
        mode: the default search mode, "chain" or "star" (see `edgellm.plan.cost`).
        prompt_tokens: P, the prompt length time-to-first-token is planned for.
        sessions: concurrent sessions: each holds a KV cache, and throughput pipelines them.
    """

    model: ModelDims
    nodes: tuple[NodeCaps, ...]
    links: tuple[LinkCaps, ...]
    codecs: tuple[CodecCost, ...]
    mode: str = "chain"
    prompt_tokens: int = 64
    sessions: int = 1
    _by_name: dict[str, NodeCaps] = field(init=False, repr=False, compare=False)
    _by_pair: dict[frozenset[str], LinkCaps] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.model, ModelDims):
            raise ConfigError("instance model must be a ModelDims")
        if not self.nodes or not all(isinstance(n, NodeCaps) for n in self.nodes):
            raise ConfigError("instance needs at least one NodeCaps (the device first)")
        if self.nodes[0].role != "device" or any(n.role == "device" for n in self.nodes[1:]):
            raise ConfigError(f"nodes[0] must be the only node with role 'device', got {[n.role for n in self.nodes]}")
        require_unique("node", [n.name for n in self.nodes])
        if not self.codecs or not all(isinstance(c, CodecCost) for c in self.codecs):
            raise ConfigError("instance needs at least one CodecCost")
        require_unique("codec", [c.name for c in self.codecs])
        require_choice("instance", "mode", self.mode, MODES)
        require_int("instance", "prompt_tokens", self.prompt_tokens, 1)
        require_int("instance", "sessions", self.sessions, 1)
        by_name = {n.name: n for n in self.nodes}
        by_pair: dict[frozenset[str], LinkCaps] = {}
        for link in self.links:
            if not isinstance(link, LinkCaps):
                raise ConfigError("instance links must be LinkCaps")
            unknown = [end for end in (link.a, link.b) if end not in by_name]
            if unknown:
                raise ConfigError(f"link {link.name} names unknown nodes {unknown}; nodes: {sorted(by_name)}")
            pair = frozenset((link.a, link.b))
            if pair in by_pair:
                raise ConfigError(f"two links join {link.a!r} and {link.b!r}")
            by_pair[pair] = link
        object.__setattr__(self, "_by_name", by_name)
        object.__setattr__(self, "_by_pair", by_pair)

    @property
    def device(self) -> NodeCaps:
        return self.nodes[0]

    def node(self, name: str) -> NodeCaps | None:
        """The node called `name`, or None."""
        return self._by_name.get(name)

    def link(self, x: str, y: str) -> LinkCaps | None:
        """The link joining x and y in either order, or None."""
        return self._by_pair.get(frozenset((x, y)))

    def codec(self, name: str) -> CodecCost | None:
        """The codec called `name`, or None."""
        return next((c for c in self.codecs if c.name == name), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model.to_json(),
            "nodes": [n.to_json() for n in self.nodes],
            "links": [link.to_json() for link in self.links],
            "codecs": [c.to_json() for c in self.codecs],
            "mode": self.mode,
            "prompt_tokens": self.prompt_tokens,
            "sessions": self.sessions,
        }

    @classmethod
    def from_json(cls, data: object) -> Instance:
        """Raises ConfigError on an unknown, missing or ill-typed field anywhere inside."""
        values = fields_of(
            "instance", data, ("model", "nodes", "links", "codecs"), ("mode", "prompt_tokens", "sessions")
        )
        values["model"] = ModelDims.from_json(values["model"])
        values["nodes"] = tuple(NodeCaps.from_json(n) for n in list_of("instance", "nodes", values["nodes"]))
        values["links"] = tuple(LinkCaps.from_json(x) for x in list_of("instance", "links", values["links"]))
        values["codecs"] = tuple(CodecCost.from_json(c) for c in list_of("instance", "codecs", values["codecs"]))
        return cls(**values)
