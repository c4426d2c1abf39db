"""The demo's default deployment, the situation the paper is about: a phone that cannot hold the full-precision
model, two edge servers one 6G hop away that can only hold it together, and a cloud behind a WAN link.

Every number here is an emulated setting, stated with its source (docs/PLANNER.md, docs/TOPOLOGY.md):
- the phone, edges and cloud use the node presets of `edgellm.deploy.presets` (compute slowdown, memory budget);
- each edge server gives this model `EDGE_MEMORY_MB`: a share of a shared MEC server, scaled to the 135M model as
  the phone's budget is, so that neither edge holds all 30 fp32 layers with its runtime and KV cache alone;
- the phone reaches edge1 over the `6g` profile (ITU-R M.2160 targets) and edge2, a neighbouring cell's server,
  over `5g` (ITU-R M.2410); the edge-to-edge backhaul is the `metro` profile (10 Gb/s Ethernet inside one MEC
  site, 0.2 ms RTT); the cloud is behind the `wan` profile.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgellm.deploy.local_deployment import free_port
from edgellm.store import DEFAULT_MODEL

EDGE_MEMORY_MB = 1000
NODES = (("phone", "device", "phone"), ("edge1", "edge", "edge-server"), ("edge2", "edge", "edge-server"),
         ("cloud", "cloud", "cloud"))  # fmt: skip


def paper_document(token_file: Path, threads: int | None = None, model: str = DEFAULT_MODEL) -> dict[str, Any]:
    """The default demo topology on free loopback ports. Its cuts are only the layout nodes start with; the
    planner chooses the real ones. `threads` None: each preset's."""
    nodes = []
    for name, role, preset in NODES:
        node: dict[str, Any] = {"name": name, "role": role, "preset": preset, "address": f"127.0.0.1:{free_port()}"}
        if threads is not None:
            node["threads"] = threads
        if role == "edge":
            node["memory_mb"] = EDGE_MEMORY_MB
        nodes.append(node)
    links = [
        {"between": ["phone", "edge1"], "profile": "6g", "codec": "none"},
        {"between": ["edge1", "edge2"], "profile": "metro", "codec": "none"},
        {"between": ["edge2", "cloud"], "profile": "wan", "codec": "none"},
        {"between": ["phone", "edge2"], "profile": "5g", "codec": "none"},
        {"between": ["phone", "cloud"], "profile": "wan", "codec": "none"},
    ]
    return {
        "model": {"name": model, "cuts": [0, 10, 20], "head": "server"},
        "deployment": {"route": [n for n, _, _ in NODES], "mode": "chain", "token_file": str(token_file)},
        "nodes": nodes,
        "links": links,
    }
