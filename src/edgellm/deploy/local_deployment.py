"""Start the nodes of a deployment as local processes, wait until they serve, and always stop them."""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from edgellm.deploy.node_builder import channel_config
from edgellm.deploy.specs import is_loopback
from edgellm.deploy.topology import Topology
from edgellm.errors import ProcessFailed
from edgellm.net.rpc import NodeUnreachable, RemoteHop
from edgellm.progress import Phase, note

log = logging.getLogger(__name__)


class LaunchError(ProcessFailed):
    """A node process exited or never became ready.

    A `ProcessFailed` (so a `PeerError`): a node that never answers is a failed peer, and rerunning may help. A
    node that exited says why in its log (quoted in the message), and the CLI exits with the node's own code:
    2 when the node rejected its topology or model, as most failed starts do.
    """


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def ensure_local_token(topology: Topology) -> bool:
    """Give a deployment that this process starts whole, on loopback, a shared secret when its `token_env` is unset:
    a fresh random one, in this process's environment, which the node processes it starts inherit. Returns True
    when it made one. A file or inline token, a variable already set, or a node off loopback: left alone (an
    unset variable is then an error where the token is read)."""
    token = topology.security.token
    if token is None or token.kind != "env" or os.environ.get(token.value, "").strip():
        return False
    if any(n.host_port is not None and not is_loopback(n.host_port[0]) for n in topology.nodes):
        return False
    os.environ[token.value] = secrets.token_hex(16)
    log.info("%s is not set: the processes started here share a fresh random token", token.value)
    return True


def layers_text(info: dict[str, Any]) -> str:
    """What a node's `Info` says it serves: `layers 20-30`, `layers 0-10+embed, head` (a device), `no layers`."""
    rows = [info] if "layers" in info else [r for r in info.get("layout", []) if r.get("node") == info.get("name")]
    parts = []
    for row in rows:
        start, end = row["layers"]
        extras = "+".join(part for part in ("embed", "head") if row.get(part))
        if end > start:
            parts.append(f"{start}-{end}{'+' + extras if extras else ''}")
        elif extras:
            parts.append(extras)
    return f"layers {', '.join(parts)}" if parts else "no layers"


class LocalDeployment:
    """The nodes of `topology` (from the file `path`) as child processes of this one.

    Use as a context manager: on exit, also through Ctrl-C or an error, every process started is terminated
    (SIGTERM, then SIGKILL after a grace period). Each node's stderr goes to `<log_dir>/<name>.log`. `node_args`
    are added to every node's command line (`edgellm node --checkpoint-dir DIR`).
    """

    def __init__(
        self,
        topology: Topology,
        path: Path,
        log_dir: Path,
        names: Sequence[str] | None = None,
        node_args: Sequence[str] = (),
    ) -> None:
        self.topology = topology
        self.path = path
        self.log_dir = log_dir
        replicas = [n.name for n in topology.nodes if n.replica_of is not None]
        self.names = list(names) if names is not None else [*topology.route, *replicas]
        self.node_args = list(node_args)
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def __enter__(self) -> LocalDeployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def start(self, timeout_s: float = 180.0) -> None:
        """Start every node, then wait until each answers `Info`, logging each as it becomes ready
        (`edge2 ready (layers 20-30, 14.2 s)`); on a terminal a bar counts them meanwhile."""
        started = time.monotonic()
        for name in self.names:
            self._spawn(name)
        count = f"{len(self.names)} node{'s' if len(self.names) != 1 else ''}"
        announce = f"starting {count}: {', '.join(self.names)} (logs in {self.log_dir}/NAME.log)"
        with Phase("start nodes", total=len(self.names), unit="ready", log=log, announce=announce) as phase:
            self._wait_ready(started, started + timeout_s, phase)
            phase.summary = f"{count} ready"

    def _spawn(self, name: str, append: bool = False) -> None:
        env = dict(os.environ)
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle stages must not spin on the cores the busy one needs
        cmd = [sys.executable, "-m", "edgellm", "node", "--topology", str(self.path), "--name", name, *self.node_args]
        with open(
            self.log_dir / f"{name}.log", "ab" if append else "wb"
        ) as log_file:  # the child keeps its own descriptor
            self.processes[name] = subprocess.Popen(
                cmd, stdout=subprocess.DEVNULL, stderr=log_file, stdin=subprocess.DEVNULL, env=env
            )

    def kill(self, name: str) -> None:
        """SIGKILL node `name` (a crash: no goodbye to its peers) and reap it."""
        proc = self.processes[name]
        proc.kill()
        proc.wait()

    def restart(self, name: str, timeout_s: float = 180.0) -> None:
        """Start node `name` again (after `kill`, or after it exited) and wait until it answers `Info`."""
        if self.processes[name].poll() is None:
            raise LaunchError(f"node {name} is still running; kill it first")
        started = time.monotonic()
        self._spawn(name, append=True)
        with Phase(f"restart {name}", total=1, unit="ready", log=log) as phase:
            saved, self.names = self.names, [name]
            try:
                self._wait_ready(started, started + timeout_s, phase)
            finally:
                self.names = saved

    def _wait_ready(self, started: float, deadline: float, phase: Phase) -> None:
        """Poll every node not yet ready until all answer `Info`; LaunchError when one exits or time runs out."""
        hops = {name: self._control_hop(name) for name in self.names}
        pending = list(self.names)
        try:
            while pending:
                for name in list(pending):
                    info = self._poll(name, hops[name])
                    if info is not None:
                        pending.remove(name)
                        phase.advance()
                        note(log, "%s ready (%s, %.1f s)", name, layers_text(info), time.monotonic() - started)
                if pending and time.monotonic() > deadline:
                    address = self.topology.node(pending[0]).address
                    raise LaunchError(
                        f"node {pending[0]} at {address} was not ready in time: {self.log_tail(pending[0])}"
                    )
                if pending:
                    time.sleep(0.2)
        finally:
            for hop in hops.values():
                hop.shutdown()

    def _control_hop(self, name: str) -> RemoteHop:
        node = self.topology.node(name)
        assert node.address is not None
        return RemoteHop(name, node.address, channel_config(self.topology))

    def _poll(self, name: str, hop: RemoteHop) -> dict[str, Any] | None:
        """The node's `Info` if it answers now, None if not yet; LaunchError if its process has exited."""
        code = self.processes[name].poll()
        if code is not None:
            raise LaunchError(f"node {name} exited with code {code} before serving: {self.log_tail(name)}", code)
        try:
            return hop.info(timeout_s=1.0)
        except NodeUnreachable:
            return None

    def log_tail(self, name: str, lines: int = 3) -> str:
        path = self.log_dir / f"{name}.log"
        text = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
        return " | ".join(text[-lines:]) or "(no output)"

    def stop(self, grace_s: float = 5.0) -> None:
        """Terminate every started process; kill those that do not exit within `grace_s`."""
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for name, proc in self.processes.items():
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                log.warning("node %s did not stop in %.0f s; killing it", name, grace_s)
                proc.kill()
                proc.wait()
        self.processes.clear()
