"""A topology's channel settings and its hops between nodes, through each link's emulation and codec."""

from __future__ import annotations

from edgellm.deploy.topology import Topology
from edgellm.errors import ConfigError
from edgellm.net.link import EmulatedLink
from edgellm.net.rpc import ChannelConfig, RemoteHop, TlsFiles


def channel_config(topology: Topology) -> ChannelConfig:
    """Token, deadline and TLS of a deployment, as its clients and servers use them."""
    tls = topology.security.tls
    files = None
    if tls is not None:
        files = TlsFiles(cert=tls.cert, key=tls.key, ca=tls.ca, client_auth=tls.client_auth)
    return ChannelConfig(token=topology.resolve_token(), deadline_s=topology.limits.deadline_s, tls=files)


def remote_hop(
    topology: Topology, sender: str, receiver: str, route: tuple[str, ...] | None, seed: int = 0
) -> RemoteHop:
    """A hop from `sender` to the server `receiver`, through their link's emulation and codec."""
    node = topology.node(receiver)
    if node.address is None:
        raise ConfigError(f"{topology.source}: node {receiver!r} has no address")
    link = topology.link_between(sender, receiver)
    emulated = EmulatedLink(link.profile, seed=seed)
    return RemoteHop(receiver, node.address, channel_config(topology), emulated, link.codec, sender, route)
