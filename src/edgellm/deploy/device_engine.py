"""This process as a deployment's device node, for `edgellm serve --topology`: its engine with the adapters of every
node of the deployment."""

from __future__ import annotations

from pathlib import Path

from edgellm.deploy.node_builder import build_node, control_hop
from edgellm.deploy.topology import load_topology
from edgellm.serve.adapter_catalog import AdapterCatalog, AdapterTarget
from edgellm.serve.device import DeviceEngine
from edgellm.serve.local_device import adapter_budget
from edgellm.split.adapter_ops import LocalAdapterTarget, RemoteAdapterTarget


def topology_device_engine(
    topology_path: str, adapters_dir: Path | None = None, adapter_budget_mb: float | None = None
) -> DeviceEngine:
    """This process as the device node of the deployment in `topology_path` (its servers must be running, e.g.
    started by `edgellm node`); adapters are loaded on the device's own stages and, by control calls, on every
    server, each sent only its layers' tensors.

    Raises:
        ConfigError: as `build_node` for the device; a missing adapter directory; a negative budget.
    """
    budget = adapter_budget(adapter_budget_mb)
    topology = load_topology(topology_path)
    device_name = topology.device.name
    built = build_node(topology, device_name)
    device: DeviceEngine = built.handler.engine  # type: ignore[attr-defined]
    targets: list[AdapterTarget] = []
    for hop in device.hops:
        host = getattr(hop, "handler", None)
        if getattr(host, "adapters", None) is not None:
            targets.append(LocalAdapterTarget(hop.name, host))
    for server in topology.servers:
        specs = [spec for owner, spec in device.layout if owner == server.name]
        if not specs:
            continue
        start, end = min(s.start for s in specs), max(s.end for s in specs)
        for node in topology.replicas(server.name):  # every replica holds the adapters its sessions may use
            hop = control_hop(topology, device_name, node.name)
            device.server_info[node.name] = lambda hop=hop: hop.info(timeout_s=2.0)  # type: ignore[misc]
            targets.append(RemoteAdapterTarget(node.name, hop.control, start, end))
    device.attach_adapters(AdapterCatalog(targets, adapters_dir, budget))
    return device
