"""The device's hops to the servers of a topology with stage replicas (`edgellm.failover`), and a server's hops to
every replica of the next stage in chain mode."""

from __future__ import annotations

import threading
from collections.abc import Callable

from edgellm.deploy.hops import channel_config, remote_hop
from edgellm.deploy.topology import Topology
from edgellm.errors import PeerError
from edgellm.failover.hop import ReplicaHop
from edgellm.failover.replicas import ReplicaTable
from edgellm.net.rpc import RemoteHop
from edgellm.split.coalesce import CoalescingHop
from edgellm.split.pipeline import Hop

PROBE_TIMEOUT_S = 1.0  # a replica that does not answer Info within this is down


def prober(topology: Topology, sender: str) -> Callable[[str], bool]:
    """node name -> whether it answers `Info` within `PROBE_TIMEOUT_S` (one control channel per node, kept)."""
    hops: dict[str, RemoteHop] = {}
    lock = threading.Lock()

    def probe(name: str) -> bool:
        with lock:
            if name not in hops:
                node = topology.node(name)
                assert node.address is not None
                hops[name] = RemoteHop(name, node.address, channel_config(topology), sender=sender)
            hop = hops[name]
        try:
            hop.info(timeout_s=PROBE_TIMEOUT_S)
            return True
        except PeerError:
            return False

    return probe


def device_replica_hops(topology: Topology, name: str) -> list[Hop]:
    """The servers' part of the device's pipeline: chain mode, one `ReplicaHop` over every server position (each
    server forwards to the replica the session's route names); star mode, one per server position."""
    servers = [s.name for s in topology.servers]
    probe = prober(topology, name)

    def first_hops(position: str, seed: int) -> dict[str, Hop]:
        return {r.name: CoalescingHop(remote_hop(topology, name, r.name, route=None, seed=seed))
                for r in topology.replicas(position)}  # fmt: skip

    if topology.mode == "chain":
        table = ReplicaTable([[r.name for r in topology.replicas(s)] for s in servers])
        return [ReplicaHop("replicas:" + "->".join(servers), table, first_hops(servers[0], 0), probe)]
    hops: list[Hop] = []
    for i, server in enumerate(servers):
        table = ReplicaTable([[r.name for r in topology.replicas(server)]])
        hops.append(ReplicaHop(f"replicas:{server}", table, first_hops(server, i), probe))
    return hops


def downstream_hops(topology: Topology, name: str) -> dict[str, Hop]:
    """Chain mode: a server's hops to every replica of the next stage, by name (a request's route picks one)."""
    nxt = topology.next_hop(name) if topology.mode == "chain" else None
    if nxt is None:
        return {}
    return {r.name: CoalescingHop(remote_hop(topology, name, r.name, route=None)) for r in topology.replicas(nxt.name)}
