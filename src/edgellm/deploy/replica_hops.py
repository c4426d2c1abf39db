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


class Prober:
    """node name -> whether it answers `Info` within `PROBE_TIMEOUT_S` (one control channel per node, kept)."""

    def __init__(self, topology: Topology, sender: str) -> None:
        self.topology, self.sender = topology, sender
        self._hops: dict[str, RemoteHop] = {}
        self._lock = threading.Lock()

    def warm(self, name: str) -> RemoteHop:
        """The control channel to `name`, opened now if it was not."""
        with self._lock:
            if name not in self._hops:
                node = self.topology.node(name)
                assert node.address is not None
                self._hops[name] = connected(RemoteHop(name, node.address, channel_config(self.topology),
                                                       sender=self.sender))  # fmt: skip
            return self._hops[name]

    def shutdown(self) -> None:
        """Close the control channels opened so far."""
        with self._lock:
            hops, self._hops = list(self._hops.values()), {}
        for hop in hops:
            hop.shutdown()

    def __call__(self, name: str) -> bool:
        try:
            self.warm(name).info(timeout_s=PROBE_TIMEOUT_S)
            return True
        except PeerError:
            return False


def prober(topology: Topology, sender: str) -> Callable[[str], bool]:
    """A `Prober` of `topology`'s nodes, as seen from `sender`."""
    return Prober(topology, sender)


def device_replica_hops(topology: Topology, name: str) -> list[Hop]:
    """The servers' part of the device's pipeline: chain mode, one `ReplicaHop` over every server position (each
    server forwards to the replica the session's route names); star mode, one per server position."""
    servers = [s.name for s in topology.servers]
    probe = Prober(topology, name)

    def first_hops(position: str, seed: int) -> dict[str, Hop]:
        return {r.name: CoalescingHop(connected(remote_hop(topology, name, r.name, route=None, seed=seed)))
                for r in topology.replicas(position)}  # fmt: skip

    for server in servers:  # the probes' channels too: a failover's first probe should not set one up
        for replica in topology.replicas(server):
            probe.warm(replica.name)

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
    # Only standby replicas connect at start: without replicas a channel opens at its first call, so a node
    # built before its downstream peer listens does not begin in gRPC's reconnect backoff (calls fail fast there).
    ready = connected if topology.has_replicas else (lambda hop: hop)
    return {r.name: CoalescingHop(ready(remote_hop(topology, name, r.name, route=None)))
            for r in topology.replicas(nxt.name)}  # fmt: skip


def connected(hop: RemoteHop) -> RemoteHop:
    """`hop`, its connection opened now: the standby replicas' hops are ready when a failover needs them."""
    hop.connect_now()
    return hop
