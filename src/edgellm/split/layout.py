"""Where a running chain deployment should run the model: the target of a live migration.

Plain data (no torch): a control plane or re-planner builds one; the device turns it into stages
(`edgellm.deploy.reconfigure`) and moves the deployment there between decode steps (`edgellm.serve.migration`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edgellm.errors import ConfigError

HEADS = ("device", "server")


@dataclass(frozen=True)
class Layout:
    """A chain deployment's split: which servers, in which order, which layers each, which weight scheme.

    Attributes:
        cuts: `cuts[i]` is the first layer of `route[i]`; the device runs `[0, cuts[0])` with the embedding
            (nothing when `cuts[0]` is 0: then `route[0]` embeds), the last server runs up to the last layer.
        route: the servers the hidden states visit, in order (the device comes first, implied); empty for a
            device-only deployment.
        head: "device" (a head-only stage on the device) or "server" (on the last server's stage).
        quant: weight scheme by node name (`edgellm.quant.scheme.parse_quant`); a node not named keeps its own.
        codecs: the smashed-data codec of the hop into each server, by server name (`edgellm.net.codec`); a
            server not named keeps its link's codec from the topology.
        device_embeds: with `cuts[0] == 0`, the device keeps the embedding alone instead of `route[0]`
            (`edgellm.model.stage.chain_stages`).

    Raises:
        ConfigError: a cut count that does not match the route, a repeated server, an unknown head placement.
    """

    cuts: tuple[int, ...]
    route: tuple[str, ...]
    head: str = "device"
    quant: Mapping[str, str] = field(default_factory=dict)
    device_embeds: bool = False
    codecs: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.cuts) != len(self.route):
            raise ConfigError(
                f"a layout needs one cut per server: {len(self.cuts)} cut(s) for route {list(self.route)}"
            )
        repeated = sorted({name for name in self.route if self.route.count(name) > 1})
        if repeated:
            raise ConfigError(f"route {list(self.route)} names {repeated} more than once")
        if self.head not in HEADS:
            raise ConfigError(f"unknown head placement {self.head!r}; choose from {list(HEADS)}")

    def to_json(self) -> dict[str, Any]:
        return {"cuts": list(self.cuts), "route": list(self.route), "head": self.head, "quant": dict(self.quant),
                "device_embeds": self.device_embeds, "codecs": dict(self.codecs)}  # fmt: skip

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Layout:
        """`{"cuts": [...], "route": [...], "head": ..., "quant": {node: scheme}}` (head and quant optional).

        Raises:
            ConfigError: a missing or mistyped field, or an invalid layout.
        """
        cuts, route = data.get("cuts"), data.get("route")
        if not isinstance(cuts, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in cuts):
            raise ConfigError(f"a layout's cuts must be a list of layer indices, got {cuts!r}")
        if not isinstance(route, list) or not all(isinstance(n, str) for n in route):
            raise ConfigError(f"a layout's route must be a list of server names, got {route!r}")
        quant = data.get("quant") or {}
        if not isinstance(quant, dict) or not all(isinstance(v, str) for v in quant.values()):
            raise ConfigError(f"a layout's quant must map node names to schemes, got {quant!r}")
        head = data.get("head") or "device"
        if not isinstance(head, str):
            raise ConfigError(f"a layout's head must be one of {list(HEADS)}, got {head!r}")
        device_embeds = data.get("device_embeds", False)
        if not isinstance(device_embeds, bool):
            raise ConfigError(f"a layout's device_embeds must be true or false, got {device_embeds!r}")
        codecs = data.get("codecs") or {}
        if not isinstance(codecs, dict) or not all(isinstance(v, str) for v in codecs.values()):
            raise ConfigError(f"a layout's codecs must map server names to codecs, got {codecs!r}")
        return cls(tuple(cuts), tuple(route), head, dict(quant), device_embeds, dict(codecs))
