"""Topology documents the control plane writes: the layout it profiles with, and the plan it chose.

Both start from the user's own file (read back as a dict, so every key they wrote survives) and change only what
the control plane decides: the route, cuts, head side, per-node scheme and per-link codec.
"""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

from edgellm.errors import ConfigError
from edgellm.plan import Plan

_PATH_KEYS = ("token_file",)
PROFILING_CONTEXT = 256
_TLS_KEYS = ("cert", "key", "ca")


def read_document(path: Path) -> dict[str, Any]:
    """The topology file as a dict, with relative secret and TLS paths made absolute (so the document can be
    written elsewhere)."""
    try:
        doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read topology: {exc}") from None
    base = Path(path).resolve().parent
    dep = doc.get("deployment", {})
    for key in _PATH_KEYS:
        if isinstance(dep.get(key), str):
            dep[key] = str(base / dep[key])
    control = doc.get("control", {})
    if isinstance(control.get("profile"), str):
        control["profile"] = str(base / control["profile"])
    tls = dep.get("tls")
    if isinstance(tls, dict):
        for key in _TLS_KEYS:
            if isinstance(tls.get(key), str):
                tls[key] = str(base / tls[key])
    return doc


def profiling_layout(doc: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """Same nodes and links; the device holds no layer, each server an even share, the head on the last server,
    no quantization, and a short `max_context` (`PROFILING_CONTEXT`) so that the KV cache and activations a node
    reserves leave room in its budget: a layout every node can load before the planner has chosen anything."""
    out = copy.deepcopy(doc)
    dep = out["deployment"]
    dep["max_context"] = min(int(dep.get("max_context", PROFILING_CONTEXT)), PROFILING_CONTEXT)
    route = out["deployment"]["route"]
    servers = len(route) - 1
    model = out["model"]
    model.pop("quant", None)
    if servers == 0:
        model["cuts"] = []
    else:
        model["cuts"] = [0, *(round(num_layers * i / servers) for i in range(1, servers))]
        model["head"] = "server"
    for node in out["nodes"]:
        node.pop("quant", None)
    return out


def planned_document(doc: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """The user's topology with the plan applied: route (nodes the plan leaves out are dropped, with their links),
    cuts, head side, mode, each node's scheme and each hop's codec."""
    out = copy.deepcopy(doc)
    stage_nodes = [s.node for s in plan.stages]
    device = out["deployment"]["route"][0]
    route = stage_nodes if stage_nodes[0] == device else [device, *stage_nodes]
    out["deployment"]["route"] = route
    out["deployment"]["mode"] = plan.mode
    model = out["model"]
    model.pop("quant", None)
    model["head"] = plan.head
    starts = [s.start for s in plan.stages]
    model["cuts"] = starts[1:] if stage_nodes[0] == device else [0, *starts[1:]]
    if stage_nodes[0] == device and model["cuts"] and model["cuts"][0] == 0:
        model["embed"] = "device"  # the device holds the embedding alone (a first cut of 0 alone means a thin one)
    else:
        model.pop("embed", None)
    schemes = {s.node: s.scheme for s in plan.stages}
    out["nodes"] = [n for n in out["nodes"] if n["name"] in route]
    for node in out["nodes"]:
        node["quant"] = schemes.get(node["name"], "none")
    hops = list(zip(route, route[1:])) if plan.mode == "chain" else [(route[0], s) for s in route[1:]]
    codecs = dict(zip((frozenset(h) for h in hops), plan.codecs))
    kept = []  # links between the nodes that stay, the plan's hops with the chosen codec (the others may serve a re-plan)
    for link in out.get("links", []):
        pair = frozenset(link["between"])
        if pair <= set(route):
            kept.append({**link, "codec": codecs[pair]} if pair in codecs else link)
    out["links"] = kept
    return out
