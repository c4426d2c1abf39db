"""`edgellm demo`: a device and edge nodes as local processes over gRPC, against two baselines.

Scenarios, all on the same prompt and decoding settings:
- split: the device holds the first layers (and the head with `head="device"`), `hops` edge nodes the rest,
  every link emulating `profile`;
- device only: every layer on the device, no network (one node process, like the others);
- cloud: every layer on one cloud node behind a `wan` link; the device only tokenizes.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgellm.deploy.local_deployment import LocalDeployment, free_port
from edgellm.deploy.node_builder import channel_config
from edgellm.deploy.topology import Topology, write_topology
from edgellm.errors import ConfigError
from edgellm.model.sampling import SamplingConfig
from edgellm.net.codec import parse_codec
from edgellm.net.link import profile as link_profile
from edgellm.net.rpc import RemoteHop
from edgellm.store import DEFAULT_MODEL, resolve_model
from edgellm.store.weights import load_config

DEFAULT_PROMPT = "Explain in two sentences why running a language model at the network edge reduces latency."


@dataclass(frozen=True)
class DemoConfig:
    """What the demo deploys and asks."""

    prompt: str = DEFAULT_PROMPT
    profile: str = "6g"
    hops: int = 2
    codec: str = "fp16"
    head: str = "device"
    max_new_tokens: int = 48
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    model: str = DEFAULT_MODEL
    threads: int = 2
    cloud_profile: str = "wan"
    speculative: dict[str, str] | None = None  # the generate request's `speculative` and `draft` (None: off)
    dp: dict[str, Any] | None = None  # the split scenario's request `dp` (DP on its smashed data; None: off)

    def __post_init__(self) -> None:
        link_profile(self.profile)
        link_profile(self.cloud_profile)
        parse_codec(self.codec)
        if not 1 <= self.hops <= 8:
            raise ConfigError(f"--hops must be in 1..8, got {self.hops}")
        if self.head not in ("device", "server"):
            raise ConfigError(f"--head must be device or server, got {self.head!r}")


def even_cuts(num_layers: int, parts: int) -> list[int]:
    """Cut `num_layers` into `parts` near-equal contiguous runs: (30, 3) -> [10, 20]."""
    if not 1 < parts <= num_layers:
        raise ConfigError(f"cannot split {num_layers} layers into {parts} stages")
    return [round(num_layers * i / parts) for i in range(1, parts)]


def split_document(cfg: DemoConfig, num_layers: int, token_file: Path) -> dict[str, Any]:
    """The topology of the split scenario: device + `cfg.hops` edge nodes in a chain on loopback."""
    names = ["device", *(f"edge{i + 1}" for i in range(cfg.hops))]
    return {
        "model": {"name": cfg.model, "cuts": even_cuts(num_layers, cfg.hops + 1), "head": cfg.head},
        "deployment": {"route": names, "mode": "chain", "token_file": str(token_file)},
        "nodes": [
            {
                "name": n,
                "role": "device" if i == 0 else "edge",
                "address": f"127.0.0.1:{free_port()}",
                "threads": cfg.threads,
            }
            for i, n in enumerate(names)
        ],  # fmt: skip
        "links": [{"between": [a, b], "profile": cfg.profile, "codec": cfg.codec} for a, b in zip(names, names[1:])],
    }


def cloud_document(cfg: DemoConfig, token_file: Path) -> dict[str, Any]:
    """The topology of the cloud baseline: the device holds no layer; one cloud node runs everything."""
    return {
        "model": {"name": cfg.model, "cuts": [0], "head": "server"},  # cut 0: the device runs no layer
        "deployment": {"route": ["device", "cloud"], "mode": "chain", "token_file": str(token_file)},
        "nodes": [
            {"name": "device", "role": "device", "address": f"127.0.0.1:{free_port()}", "threads": cfg.threads},
            {"name": "cloud", "role": "cloud", "address": f"127.0.0.1:{free_port()}", "threads": cfg.threads},
        ],
        "links": [{"between": ["device", "cloud"], "profile": cfg.cloud_profile, "codec": "none"}],
    }


def generate_request(cfg: DemoConfig) -> dict[str, Any]:
    return {"prompt": cfg.prompt, "chat": True, "max_new_tokens": cfg.max_new_tokens, **cfg.sampling.to_json(),
            **(cfg.speculative or {})}  # fmt: skip


def run_deployed(topology: Topology, path: Path, log_dir: Path, request: dict[str, Any],
                 on_text: Callable[[str], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """Start the topology's nodes, generate through its device node, stop the nodes; returns the report."""
    with LocalDeployment(topology, path, log_dir):
        device = topology.device
        assert device.address is not None
        hop = RemoteHop(device.name, device.address, channel_config(topology), sender="demo")
        report: dict[str, Any] = {}
        try:
            for event in hop.generate(request):
                if "report" in event:
                    report = event["report"]
                elif on_text is not None:
                    on_text(event["text"])
        finally:
            hop.shutdown()
    return report


def device_document(cfg: DemoConfig, token_file: Path) -> dict[str, Any]:
    """The topology of the device-only baseline: one node, every layer, no network."""
    return {
        "model": {"name": cfg.model, "cuts": [], "head": "device"},
        "deployment": {"route": ["device"], "token_file": str(token_file)},
        "nodes": [{"name": "device", "role": "device", "address": f"127.0.0.1:{free_port()}", "threads": cfg.threads}],
    }


def run_demo(cfg: DemoConfig, on_text: Callable[[str], None] | None = None,
             on_phase: Callable[[str], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """Run the three scenarios; returns the split report with `baselines` and `breakdown` added."""
    phase = on_phase or (lambda _: None)
    num_layers = int(load_config(resolve_model(cfg.model)).num_hidden_layers)
    with tempfile.TemporaryDirectory(prefix="edgellm-demo-") as tmp:
        work = Path(tmp)
        token_file = work / "token"
        token_file.write_text(secrets.token_hex(16))
        os.chmod(token_file, 0o600)
        request = generate_request(cfg)
        phase(f"split: device + {cfg.hops} edge node(s), {cfg.profile} links, codec {cfg.codec}, head on {cfg.head}")
        split_path = work / "split.toml"
        split_request = {**request, **({"dp": cfg.dp} if cfg.dp is not None else {})}  # no data leaves a baseline
        split = run_deployed(write_topology(split_path, split_document(cfg, num_layers, token_file)), split_path,
                             work, split_request, on_text)  # fmt: skip
        phase("baseline: all layers on the device")
        alone_path = work / "device.toml"
        alone = run_deployed(write_topology(alone_path, device_document(cfg, token_file)), alone_path, work, request)
        phase(f"baseline: all layers on a cloud node over {cfg.cloud_profile}")
        cloud_path = work / "cloud.toml"
        cloud = run_deployed(write_topology(cloud_path, cloud_document(cfg, token_file)), cloud_path, work, request)
    split["baselines"] = {"device_only": alone, "cloud": cloud}
    split["breakdown"] = {
        "split": per_token_breakdown(split),
        "device_only": per_token_breakdown(alone),
        "cloud": per_token_breakdown(cloud),
    }
    split.update({"profile": cfg.profile, "codec": cfg.codec, "hops": cfg.hops, "threads": cfg.threads})
    return split


def per_token_breakdown(report: dict[str, Any]) -> dict[str, float]:
    """Milliseconds per decoded token: compute per node, wire per link, and the rest ("other")."""
    rate = report.get("decode_tok_per_s") or 0.0
    total = 1e3 / rate if rate > 0 else 0.0
    parts: dict[str, float] = {}
    for node in report["nodes"]:
        parts[f"compute {node['name']}"] = node.get("compute_ms_per_token") or 0.0
    for link in report["links"]:
        parts[f"wire {link['from']}->{link['to']}"] = link.get("wire_ms_per_token") or 0.0
    parts["other"] = max(total - sum(parts.values()), 0.0)
    return {"total": round(total, 3), **{k: round(v, 3) for k, v in parts.items()}}
