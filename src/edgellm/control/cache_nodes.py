"""Cache nodes as processes on this machine, and what the control plane asks of them: hold these variants
(`sync`), what do you hold (`reports`), generate with a variant (`generate`).

Each node is `edgellm cache node` in its own process with its own store; the processes share a fresh random
token unless the caller's environment sets one. The origin (the cloud) is a node too: its store holds every
variant, published into it before it starts.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from edgellm.blocks import Manifest
from edgellm.blocks.manifest import lineage
from edgellm.deploy.local_deployment import LaunchError
from edgellm.errors import ConfigError
from edgellm.net.link import LinkProfile
from edgellm.net.rpc import ChannelConfig, RemoteHop
from edgellm.progress import Phase

log = logging.getLogger(__name__)

TOKEN_ENV = "EDGELLM_TOKEN"


@dataclass(frozen=True)
class CacheNodeSpec:
    """One node to start: its name, store folder and storage budget (None: unbounded, the origin's)."""

    name: str
    store: Path
    storage_bytes: int | None = None


class CacheNodes:
    """Start cache nodes as processes (`with CacheNodes(specs, log_dir) as nodes:`), talk to them, stop them."""

    def __init__(self, specs: Sequence[CacheNodeSpec], log_dir: Path, dtype: str = "fp32") -> None:
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ConfigError(f"cache node names must be unique: {names}")
        self.specs = {s.name: s for s in specs}
        self.log_dir, self.dtype = log_dir, dtype
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.addresses: dict[str, str] = {}
        self.hops: dict[str, RemoteHop] = {}
        if not os.environ.get(TOKEN_ENV, "").strip():
            os.environ[TOKEN_ENV] = secrets.token_hex(16)  # inherited by the nodes started here
        self.channel = ChannelConfig(token=os.environ[TOKEN_ENV], deadline_s=600.0)

    def __enter__(self) -> CacheNodes:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def start(self, timeout_s: float = 120.0) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
        for spec in self.specs.values():
            cmd = [sys.executable, "-m", "edgellm", "cache", "node", "--name", spec.name, "--store", str(spec.store),
                   "--dtype", self.dtype, "--token-env", TOKEN_ENV]  # fmt: skip
            if spec.storage_bytes is not None:
                cmd += ["--storage-mb", repr(spec.storage_bytes / 1e6)]
            with open(self.log_dir / f"{spec.name}.log", "wb") as log_file:
                self.processes[spec.name] = subprocess.Popen(
                    cmd, stdout=subprocess.PIPE, stderr=log_file, stdin=subprocess.DEVNULL, env=env
                )
        with Phase("start cache nodes", total=len(self.specs), unit="ready", log=log) as phase:
            for name, process in self.processes.items():
                self.addresses[name] = self._ready_address(name, process, time.monotonic() + timeout_s)
                self.hops[name] = RemoteHop(name, self.addresses[name], self.channel)
                phase.advance()

    def _ready_address(self, name: str, process: subprocess.Popen[bytes], deadline: float) -> str:
        assert process.stdout is not None
        result: list[str] = []
        reader = threading.Thread(target=lambda: result.append(process.stdout.readline().decode()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(max(0.0, deadline - time.monotonic()))
        line = result[0] if result else ""
        try:
            event = json.loads(line)
            return str(event["address"])
        except (ValueError, KeyError, TypeError):
            tail = (self.log_dir / f"{name}.log").read_text(errors="replace").strip().splitlines()[-3:]
            raise LaunchError(f"cache node {name} did not start: {' | '.join(tail) or 'no output'}") from None

    def stop(self, grace_s: float = 5.0) -> None:
        for hop in self.hops.values():
            hop.shutdown()
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(grace_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()
        self.hops.clear()

    # -- what the control plane asks

    def reports(self) -> dict[str, dict[str, Any]]:
        """Each node's `blocks` report (bytes used, variants held, ...)."""
        return {name: hop.control({"op": "blocks"}) for name, hop in self.hops.items()}

    def held(self) -> dict[str, list[str]]:
        return {name: list(hop.info()["held"]) for name, hop in self.hops.items()}

    def sync(
        self,
        holdings: Mapping[str, set[str] | frozenset[str]],
        manifests: Mapping[str, Manifest],
        order: Mapping[str, Sequence[str]],
        links: Mapping[tuple[str, str], LinkProfile] | None = None,
    ) -> dict[str, dict[str, Any]]:
        """Make each node of `holdings` hold exactly its variants, all nodes at once; a node fetches each block from
        the first of `order[node]` (node names) that has it intact, through the emulated link `links[(node,
        source)]` where one is given. -> each node's answer (bytes evicted, fetched per source, refused, seconds).
        """

        def one(name: str) -> dict[str, Any]:
            chains = {m.name: m for v in holdings[name] for m in lineage(dict(manifests), v)}
            sources = [{"name": s, "address": self.addresses[s],
                        **({"link": vars(links[(name, s)])} if links and (name, s) in links else {})}
                       for s in order.get(name, ()) if s != name]  # fmt: skip
            request = {"op": "blocks_sync", "variants": sorted(holdings[name]),
                       "manifests": [m.to_json() for m in chains.values()], "sources": sources}  # fmt: skip
            return self.hops[name].control(request, timeout_s=600.0)

        with ThreadPoolExecutor(max_workers=max(1, len(holdings))) as pool:
            answers = dict(zip(holdings, pool.map(one, holdings), strict=True))
        return answers

    def generate(self, node: str, variant: str, request: Mapping[str, Any]) -> tuple[list[int], dict[str, Any]]:
        """Generate with `variant` on `node`: -> (token ids, the node's report)."""
        tokens: list[int] = []
        report: dict[str, Any] = {}
        for event in self.stream(node, variant, request):
            if "token" in event:
                tokens.append(int(event["token"]))
            report = event.get("report", report)
        return tokens, report

    def stream(self, node: str, variant: str, request: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
        if node not in self.hops:
            raise ConfigError(f"no cache node {node!r}; nodes: {sorted(self.hops)}")
        return self.hops[node].generate({**request, "model": variant})
