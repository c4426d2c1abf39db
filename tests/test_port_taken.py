"""A second server on a taken port fails with a clear error instead of sharing the port (gRPC's SO_REUSEPORT)."""

from __future__ import annotations

import pytest

from edgellm.deploy.local_deployment import free_port
from edgellm.errors import ConfigError
from edgellm.net.rpc import ChannelConfig, serve


class Idle:
    """A handler that answers Info only."""

    def info(self) -> dict:
        return {"name": "first"}


def test_a_second_server_on_a_taken_port_is_refused():
    address = f"127.0.0.1:{free_port()}"
    first, _ = serve(Idle(), address, ChannelConfig())  # type: ignore[arg-type]
    try:
        with pytest.raises(ConfigError, match="cannot listen on"):
            serve(Idle(), address, ChannelConfig())  # type: ignore[arg-type]
    finally:
        first.stop(grace=None)


@pytest.mark.multiprocess
def test_a_node_started_twice_exits_naming_the_node_that_serves_it(tiny_chat_dir, tmp_path):
    import subprocess
    import sys

    from edgellm.deploy.local_deployment import LocalDeployment
    from edgellm.deploy.topology import write_topology

    doc = {
        "model": {"name": str(tiny_chat_dir), "cuts": []},
        "deployment": {"route": ["device"], "token": "secret-91ab"},
        "nodes": [{"name": "device", "role": "device", "address": f"127.0.0.1:{free_port()}"}],
    }
    path = tmp_path / "t.toml"
    topology = write_topology(path, doc)
    with LocalDeployment(topology, path, tmp_path):
        second = subprocess.run([sys.executable, "-m", "edgellm", "node", "--topology", str(path), "--name", "device"],
                                capture_output=True, text=True, timeout=120)  # fmt: skip
    assert second.returncode == 2, second.stderr
    assert "cannot listen on" in second.stderr and "node 'device' of this deployment already serves it" in second.stderr
