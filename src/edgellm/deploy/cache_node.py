"""An edge cache node: a block store under a storage budget that serves the variants it holds, whole.

A cache node keeps model variants as blocks (`edgellm.blocks`), fetches and evicts them when told which to hold
(`blocks_sync`), gives its blocks to peers (`block_get`), reports what it holds (`Info`, `blocks`), and answers
`Generate` for a variant it holds: the request names it in `model`; a base model runs as it is, a LoRA variant
as its base with the adapter (one engine per base, every LoRA variant of it sharing the base's weights in
memory). A variant's blocks are pinned while a generation uses it, so a sync that drops it never interrupts one.
docs/CACHING.md.

Control ops (besides `echo` and `info`):
- `blocks`: the store's report; `block_has` (`digests`): which of them it holds;
- `block_get` (`digest`, `offset`, `length` <= `MAX_CHUNK_BYTES`): `{"data": base64, "size": block bytes}`;
- `blocks_sync` (`variants`: names to hold; `manifests`: their manifest objects (and their bases'); `sources`:
  `[{"name", "address"}]` to fetch from, in order of preference): evicts what no listed variant needs, then
  fetches what is missing, each block checked against its digest; -> what moved.
"""

from __future__ import annotations

import base64
import logging
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgellm.blocks import BlockStore, Manifest
from edgellm.blocks.fetch import fetch_blocks
from edgellm.blocks.manifest import lineage
from edgellm.errors import ConfigError, EdgellmError
from edgellm.net.link import EmulatedLink, LinkProfile
from edgellm.net.rpc import ChannelConfig, RemoteHop, serve
from edgellm.progress import note
from edgellm.serve.device import DeviceEngine
from edgellm.split import compute_thread
from edgellm.split.budget import rss_bytes
from edgellm.split.control import Field, node_ops
from edgellm.split.limits import SessionLimits

log = logging.getLogger(__name__)

SYNC_WAIT_S = 600.0  # a sync's fetch waits this long for generations holding evicted blocks to end
MAX_CHUNK_BYTES = 4 << 20  # one block_get reply's bytes (base64 adds a third on the wire)


class PeerSource:
    """Blocks from another node's store over the transport (`block_get` in chunks), optionally through an
    emulated link (`link`: the backhaul between the two nodes, an emulated setting)."""

    def __init__(self, name: str, address: str, channel: ChannelConfig, link: LinkProfile | None = None) -> None:
        self.name = name
        self.hop = RemoteHop(name, address, channel)
        self.link = None if link is None else EmulatedLink(link)

    def has(self, digest: str) -> bool:
        return digest in self.hop.control({"op": "block_has", "digests": [digest]})["held"]

    def read_block(self, digest: str, size_bytes: int) -> bytes:
        parts: list[bytes] = []
        offset = 0
        while offset < size_bytes or not parts:
            length = min(MAX_CHUNK_BYTES, size_bytes - offset)
            reply = self.hop.control({"op": "block_get", "digest": digest, "offset": offset, "length": length})
            chunk = base64.b64decode(reply["data"])
            if self.link is not None:
                self.link.send(len(chunk), "down")
            parts.append(chunk)
            offset += len(chunk)
            if not chunk:
                break
        return b"".join(parts)

    def close(self) -> None:
        self.hop.shutdown()


class CacheNode:
    """`edgellm.net.rpc.NodeHandler` of a cache node (see the module's docstring).

    Args:
        name: the node's name.
        store: its block store (its budget is the node's storage).
        channel: how it reaches peers to fetch blocks (token, TLS).
        dtype, threads, limits: of the engines it builds for the variants it serves.
    """

    def __init__(self, name: str, store: BlockStore, channel: ChannelConfig, dtype: str = "fp32",
                 threads: int | None = None, limits: SessionLimits = SessionLimits()) -> None:  # fmt: skip
        self.name, self.store, self.channel = name, store, channel
        self.dtype, self.threads, self.limits = dtype, threads, limits
        self._engines: dict[str, DeviceEngine] = {}  # base model variant -> its engine
        self._active: dict[str, int] = {}  # base -> generations running on its engine
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self.ops = node_ops(name, self.info, dict)  # echo, info (a cache node has no emulated hops)
        self.ops.register("blocks", lambda r: self.store.report())
        self.ops.register("block_has", lambda r: {"held": [d for d in r["digests"] if self.store.has(str(d))]},
                          {"digests": Field(list, required=True)})  # fmt: skip
        self.ops.register("block_get", self._block_get, {"digest": Field(str, required=True),
                          "offset": Field(int, default=0), "length": Field(int, default=MAX_CHUNK_BYTES)})  # fmt: skip
        self.ops.register("blocks_sync", self._sync, {"variants": Field(list, required=True),
                          "manifests": Field(list, default=[]), "sources": Field(list, default=[])})  # fmt: skip

    # -- NodeHandler

    def info(self) -> dict[str, Any]:
        with self._lock:
            engines = sorted(self._engines)
        return {"name": self.name, "role": "cache", "held": self.store.held(), "engines": engines,
                "store": self.store.report(), "memory": {"rss_bytes": rss_bytes()}}  # fmt: skip

    def control(self, request: dict[str, Any]) -> dict[str, Any]:
        return self.ops.dispatch(request)

    def forward(self, frame: bytes) -> bytes:
        raise ConfigError(f"node {self.name} is a cache node: it serves whole variants by Generate, not stages")

    def close(self, frame: bytes) -> None:
        raise ConfigError(f"node {self.name} is a cache node: it holds no stage sessions")

    def train(self, frame: bytes) -> bytes:
        raise ConfigError(f"node {self.name} is a cache node: it does not train")

    def generate(self, request: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Generate with the variant `request["model"]` (the rest is an ordinary generate request).

        Raises:
            ConfigError: no `model`, or a variant this node does not hold (the caller routes elsewhere).
        """
        request = dict(request)
        variant = request.pop("model", None)
        if not isinstance(variant, str):
            raise ConfigError(f"node {self.name}: a cache node's generate request names its variant in 'model'")
        if request.get("adapter") is not None:
            raise ConfigError(f"node {self.name}: name the variant in 'model', not 'adapter'")
        if not self.store.holds(variant):
            raise ConfigError(f"node {self.name} does not hold variant {variant!r}; it holds {self.store.held()}")
        return self._generate(variant, request)

    def _generate(self, variant: str, request: dict[str, Any]) -> Iterator[dict[str, Any]]:
        with self.store.pinned(variant):
            chain = lineage(self.store.manifests(), variant)
            base = chain[-1].name
            engine = self._engine(base)
            try:
                if len(chain) > 1:
                    assert engine.adapters is not None  # local_device_engine attaches a catalog
                    engine.adapters.load(variant, str(self.store.view(variant)))
                    request["adapter"] = variant
                for event in engine.generate(request):
                    if "report" in event:
                        event = {"report": {**event["report"], "model": variant, "node": self.name}}
                    yield event
            finally:
                with self._lock:
                    self._active[base] -= 1

    def _engine(self, base: str) -> DeviceEngine:
        from edgellm.serve.local_device import local_device_engine

        with self._lock:
            engine = self._engines.get(base)
            if engine is None:
                view = self.store.view(base)
                engine = compute_thread.run(lambda: local_device_engine(str(view), dtype=self.dtype,
                                                                        threads=self.threads, limits=self.limits))  # fmt: skip
                self._engines[base] = engine
                log.info("node %s: engine for %s built", self.name, base)
            self._active[base] = self._active.get(base, 0) + 1
            return engine

    # -- control ops

    def _block_get(self, request: dict[str, Any]) -> dict[str, Any]:
        digest, offset, length = request["digest"], request["offset"], request["length"]
        if not 0 < length <= MAX_CHUNK_BYTES or offset < 0:
            raise ConfigError(f"block_get: offset must be >= 0 and length in (0, {MAX_CHUNK_BYTES}]")
        size = self.store.digests().get(digest)
        if size is None:
            raise ConfigError(f"node {self.name} holds no block {digest[:12]}")
        data = self.store.read(digest, offset, length)
        return {"data": base64.b64encode(data).decode("ascii"), "size": size}

    def _sync(self, request: dict[str, Any]) -> dict[str, Any]:
        variants = {str(v) for v in request["variants"]}
        manifests = [Manifest.from_json(m) for m in request["manifests"]]
        sources = [_source(s, self.channel) for s in request["sources"]]
        with self._sync_lock:
            for manifest in manifests:
                self.store.add_manifest(manifest)
            known = self.store.manifests()
            unknown = sorted(variants - set(known))
            if unknown:
                raise ConfigError(f"blocks_sync: no manifest for {unknown}; send them in 'manifests'")
            kept = self.store.retain(variants)
            self._drop_engines()
            try:
                wanted = self.store.missing(variants)
                fetched = fetch_blocks(self.store, wanted, sources, SYNC_WAIT_S)
            finally:
                for source in sources:
                    source.close()
            return {"node": self.name, **kept, **fetched.to_json(), "held": self.store.held(),
                    "used_bytes": self.store.used_bytes, "budget_bytes": self.store.budget_bytes}  # fmt: skip

    def _drop_engines(self) -> None:
        """Let go of the engines (and adapters) of variants the store no longer holds, unless in use."""
        held = set(self.store.held())
        with self._lock:
            for base, engine in list(self._engines.items()):
                if base not in held and not self._active.get(base):
                    del self._engines[base]
                    log.info("node %s: engine for %s dropped", self.name, base)
                elif engine.adapters is not None:
                    for entry in engine.adapters.listing():
                        if entry["loaded"] and entry["name"] not in held and not entry["in_use"]:
                            engine.adapters.unload(entry["name"])


def _source(spec: object, channel: ChannelConfig) -> PeerSource:
    if not isinstance(spec, dict) or not isinstance(spec.get("address"), str):
        raise ConfigError(f"blocks_sync: a source is {{'name': ..., 'address': 'host:port'}}, got {spec!r}")
    link = spec.get("link")
    try:
        profile = None if link is None else LinkProfile(**link)
    except (TypeError, EdgellmError) as exc:
        raise ConfigError(f"blocks_sync: bad link of source {spec.get('name')!r}: {exc}") from None
    return PeerSource(str(spec.get("name") or spec["address"]), spec["address"], channel, profile)


def open_store(path: Path, storage_mb: float | None) -> BlockStore:
    if storage_mb is not None and storage_mb < 0:
        raise ConfigError(f"--storage-mb must be >= 0, got {storage_mb}")
    return BlockStore(path, None if storage_mb is None else int(storage_mb * 1e6))


def run_cache_node(node: CacheNode, address: str, on_ready: Any = None) -> int:
    """Serve `node` on `address` until SIGINT/SIGTERM; `on_ready` gets {"event": "ready", ...} once it listens."""
    started = time.perf_counter()
    server, port = serve(node, address, node.channel)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    held = node.store.held()
    host = address.rsplit(":", 1)[0]
    note(log, "cache node %s listening on %s:%d: %d variant(s) held, %.1f of %s MB used, ready in %.1f s",
         node.name, host, port, len(held), node.store.used_bytes / 1e6,
         "unbounded" if node.store.budget_bytes is None else f"{node.store.budget_bytes / 1e6:.1f}",
         time.perf_counter() - started)  # fmt: skip
    if on_ready is not None:
        on_ready({"event": "ready", "name": node.name, "address": f"{host}:{port}", "port": port, "held": held})
    compute_thread.install().serve(stop)  # engines are built and run on this thread (the fastest, see there)
    server.stop(grace=1.0).wait()
    return 0
