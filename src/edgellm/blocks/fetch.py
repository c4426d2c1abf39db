"""Fetch the blocks a store lacks from sources in order of preference, refusing any whose bytes do not hash to
their digest (`put` checks) and trying the next source for it.

A source is anything that reads a block's bytes by digest (`BlockSource`): another store on this machine (the
origin a model was published to), or a peer node over the transport (`edgellm.deploy.cache_node.PeerSource`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from edgellm.blocks.store import BlockStore
from edgellm.errors import EdgellmError, PeerError
from edgellm.progress import Phase

log = logging.getLogger(__name__)


class BlockSource(Protocol):
    """Where blocks come from."""

    name: str

    def has(self, digest: str) -> bool: ...

    def read_block(self, digest: str, size_bytes: int) -> bytes: ...


class StoreSource:
    """Another block store on this machine (an origin): `name` is how reports call it."""

    def __init__(self, store: BlockStore, name: str = "origin") -> None:
        self.store, self.name = store, name

    def has(self, digest: str) -> bool:
        return self.store.has(digest)

    def read_block(self, digest: str, size_bytes: int) -> bytes:
        return self.store.read(digest)


@dataclass
class FetchReport:
    """What one fetch moved: bytes per source, blocks refused (digest, source, why), seconds."""

    fetched_bytes: dict[str, int] = field(default_factory=dict)
    blocks: int = 0
    refused: list[tuple[str, str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"fetched_bytes": dict(self.fetched_bytes), "blocks": self.blocks, "seconds": round(self.seconds, 3),
                "refused": [{"digest": d, "source": s, "why": w} for d, s, w in self.refused]}  # fmt: skip


def fetch_blocks(
    store: BlockStore, wanted: dict[str, int], sources: Sequence[BlockSource], wait_s: float = 0.0
) -> FetchReport:
    """Put every block of `wanted` ({digest: size}) that `store` lacks into it, each from the first source that
    has it and gives bytes matching its digest; a block that does not fit until generations using evicted
    blocks end waits for them up to `wait_s` (`BlockStore.put`).

    Raises:
        PeerError: a block no source could give intact (what each said is in the message).
        BusyError: the store's budget is full.
    """
    report = FetchReport()
    start = time.perf_counter()
    todo = {d: size for d, size in wanted.items() if not store.has(d)}
    with Phase("fetch blocks", total=sum(todo.values()), unit="B", log=log) as phase:
        for digest, size in sorted(todo.items()):
            _fetch_one(store, digest, size, sources, report, wait_s)
            phase.advance(size)
        phase.summary = f"{report.blocks} blocks, {sum(report.fetched_bytes.values()) / 1e6:.1f} MB"
    report.seconds = time.perf_counter() - start
    return report


def _fetch_one(
    store: BlockStore, digest: str, size: int, sources: Sequence[BlockSource], report: FetchReport, wait_s: float
) -> None:
    tried: list[str] = []
    for source in sources:
        try:
            if not source.has(digest):
                continue
            data = source.read_block(digest, size)
        except EdgellmError as exc:
            tried.append(f"{source.name}: {exc}")
            continue
        if len(data) != size or not store.put(digest, data, wait_s):
            report.refused.append((digest, source.name, "bytes do not match the digest"))
            log.warning("block %s from %s refused: its bytes do not match its digest", digest[:12], source.name)
            tried.append(f"{source.name}: corrupt")
            continue
        report.fetched_bytes[source.name] = report.fetched_bytes.get(source.name, 0) + size
        report.blocks += 1
        return
    raise PeerError(f"block {digest[:12]} ({size} B) could not be fetched intact: "
                    f"{'; '.join(tried) or 'no source has it'}")  # fmt: skip
