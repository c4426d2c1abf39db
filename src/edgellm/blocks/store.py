"""A node's block store on disk: each block once, by digest, under a byte budget; the variants it holds.

    root/objects/ab/<digest>      a block's bytes (written atomically, checked against the digest on the way in)
    root/manifests/<name>.json    the manifests of the variants the store knows
    root/views/<name>/            a variant as a model or adapter directory of links to its blocks (`view`)

A block is kept while a kept manifest needs it; `retain(names)` drops the others, except blocks pinned by a
generation in progress (`pinned`), which are dropped when their last pin goes. `put` refuses a block that would
take the store past its budget (`BusyError`): evict first. Thread-safe.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgellm.blocks.manifest import DIGEST, Manifest, lineage, required_digests
from edgellm.errors import BusyError, ConfigError

CHUNK_BYTES = 1 << 20
VIEW_STAMP = ".edgellm-view"  # in a view: the digest of the manifest it was made from


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_path(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


class BlockStore:
    """The blocks and manifests under `root`; `budget_bytes` bounds the blocks' bytes (None: unbounded)."""

    def __init__(self, root: Path, budget_bytes: int | None = None) -> None:
        if budget_bytes is not None and budget_bytes < 0:
            raise ConfigError(f"a block store's budget must be >= 0 bytes, got {budget_bytes}")
        self.root = Path(root)
        self.budget_bytes = budget_bytes
        self._lock = threading.RLock()
        self._released = threading.Condition(self._lock)  # notified when pinned blocks doomed by `retain` go
        self._pins: dict[str, int] = {}  # digest -> pins held by generations in progress
        self._doomed: set[str] = set()  # blocks no kept manifest needs, waiting for their pins to go
        for sub in ("objects", "manifests", "views"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._sizes = self._scan()

    def _scan(self) -> dict[str, int]:
        sizes: dict[str, int] = {}
        for path in (self.root / "objects").glob("*/*"):
            if DIGEST.fullmatch(path.name):
                sizes[path.name] = path.stat().st_size
            elif path.name.startswith("."):  # a write interrupted before its rename
                path.unlink(missing_ok=True)
        return sizes

    # -- blocks

    def path(self, digest: str) -> Path:
        if not DIGEST.fullmatch(digest):
            raise ConfigError(f"not a block digest: {digest[:80]!r}")
        return self.root / "objects" / digest[:2] / digest

    def has(self, digest: str) -> bool:
        with self._lock:
            return digest in self._sizes

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(self._sizes.values())

    def digests(self) -> dict[str, int]:
        with self._lock:
            return dict(self._sizes)

    def put(self, digest: str, data: bytes, wait_s: float = 0.0) -> bool:
        """Keep `data` as block `digest`; False (nothing written) if its bytes do not hash to `digest`. Where it
        does not fit yet but blocks `retain` evicted are waiting for generations to end, wait up to `wait_s`.

        Raises:
            BusyError: it would take the store past its budget.
        """
        if sha256_bytes(data) != digest:
            return False
        deadline = time.monotonic() + wait_s
        with self._lock:
            if digest in self._sizes:
                return True
            while self.budget_bytes is not None and self.used_bytes + len(data) > self.budget_bytes:
                left = deadline - time.monotonic()
                if not self._doomed or left <= 0:
                    waiting = f" ({len(self._doomed)} evicted blocks still in use)" if self._doomed else ""
                    raise BusyError(f"block {digest[:12]} ({len(data)} B) does not fit the store's budget: "
                                    f"{self.used_bytes} of {self.budget_bytes} B used{waiting}")  # fmt: skip
                self._released.wait(left)
            path = self.path(digest)
            path.parent.mkdir(exist_ok=True)
            tmp = path.with_name(f".{digest}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
            self._sizes[digest] = len(data)
            self._doomed.discard(digest)
            return True

    def read(self, digest: str, offset: int = 0, length: int | None = None) -> bytes:
        """Bytes [offset, offset + length) of a block. Raises ConfigError for a block the store lacks."""
        with self._lock:
            if digest not in self._sizes:
                raise ConfigError(f"this store holds no block {digest[:12]}")
            with self.path(digest).open("rb") as f:
                f.seek(offset)
                return f.read(-1 if length is None else length)

    def verify(self, digest: str) -> bool:
        """Hash a held block again; a corrupt one is removed (and must be fetched again). False then."""
        with self._lock:
            if digest not in self._sizes:
                return False
            if sha256_path(self.path(digest)) == digest:
                return True
            self._remove(digest)
            return False

    def _remove(self, digest: str) -> None:
        self.path(digest).unlink(missing_ok=True)
        self._sizes.pop(digest, None)
        self._doomed.discard(digest)

    # -- manifests

    def manifests(self) -> dict[str, Manifest]:
        out: dict[str, Manifest] = {}
        for path in sorted((self.root / "manifests").glob("*.json")):
            manifest = Manifest.from_json(json.loads(path.read_text()))
            out[manifest.name] = manifest
        return out

    def add_manifest(self, manifest: Manifest) -> None:
        path = self.root / "manifests" / f"{manifest.name}.json"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(manifest.to_json()))
        os.replace(tmp, path)

    def missing(self, names: set[str] | frozenset[str], manifests: dict[str, Manifest] | None = None) -> dict[str, int]:
        """{digest: size} of the blocks variants `names` need and the store lacks."""
        need = required_digests(manifests if manifests is not None else self.manifests(), names)
        with self._lock:
            return {d: size for d, size in need.items() if d not in self._sizes}

    def holds(self, name: str) -> bool:
        """The store has variant `name`'s manifest, its base's, and every block of both."""
        manifests = self.manifests()
        try:
            return not self.missing({name}, manifests)
        except ConfigError:
            return False

    def held(self) -> list[str]:
        manifests = self.manifests()
        return sorted(name for name in manifests if self._complete(manifests, name))

    def _complete(self, manifests: dict[str, Manifest], name: str) -> bool:
        try:
            return not self.missing({name}, manifests)
        except ConfigError:
            return False

    # -- keeping and evicting

    @contextlib.contextmanager
    def pinned(self, name: str) -> Iterator[None]:
        """Keep variant `name`'s blocks (and its base's) for the body, whatever `retain` decides meanwhile."""
        digests = list(required_digests(self.manifests(), {name}))
        with self._lock:
            for d in digests:
                self._pins[d] = self._pins.get(d, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                for d in digests:
                    self._pins[d] -= 1
                    if not self._pins[d]:
                        del self._pins[d]
                        if d in self._doomed:
                            self._remove(d)
                            self._released.notify_all()

    def retain(self, names: set[str] | frozenset[str]) -> dict[str, Any]:
        """Keep only what variants `names` need: other manifests and blocks are removed (pinned blocks when their
        last pin goes). Returns {"evicted_bytes", "deferred_bytes", "dropped": [variant names]}."""
        with self._lock:
            manifests = self.manifests()
            keep_names = {m.name for n in names if n in manifests for m in lineage(manifests, n)}
            need = required_digests(manifests, keep_names)
            evicted = deferred = 0
            for digest, size in list(self._sizes.items()):
                if digest in need:
                    continue
                if self._pins.get(digest):
                    self._doomed.add(digest)
                    deferred += size
                else:
                    self._remove(digest)
                    evicted += size
            dropped = sorted(set(manifests) - keep_names)
            for name in dropped:
                (self.root / "manifests" / f"{name}.json").unlink(missing_ok=True)
                shutil.rmtree(self.root / "views" / name, ignore_errors=True)
            return {"evicted_bytes": evicted, "deferred_bytes": deferred, "dropped": dropped}

    # -- views

    def view(self, name: str) -> Path:
        """Variant `name` as a directory (a model directory, or a peft adapter directory) of links to its blocks:
        its file blocks under their names, its tensor blocks under `blocks/` with a safetensors index naming them.

        Raises:
            ConfigError: the store does not hold the variant.
        """
        manifests = self.manifests()
        if not self._complete(manifests, name):
            raise ConfigError(f"this store does not hold variant {name!r}; it holds {self.held() or 'none'}")
        manifest = manifests[name]
        directory = self.root / "views" / name
        stamp = sha256_bytes(json.dumps(manifest.to_json(), sort_keys=True).encode())
        if (directory / VIEW_STAMP).is_file() and (directory / VIEW_STAMP).read_text() == stamp:
            return directory  # unchanged: the same links (and the index's mtime, which quantized stages key on)
        tmp = directory.with_name(f".{name}.{os.getpid()}.{threading.get_ident()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "blocks").mkdir(parents=True)
        weight_map: dict[str, str] = {}
        for block in manifest.blocks:
            if block.kind == "file":
                (tmp / block.name).symlink_to(self.path(block.digest))
            else:
                link = f"blocks/{block.name}.safetensors"
                (tmp / link).symlink_to(self.path(block.digest))
                weight_map.update({tensor: link for tensor in block.tensors})
        if weight_map:
            index = {"metadata": {"variant": name}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        (tmp / VIEW_STAMP).write_text(stamp)
        with self._lock:
            shutil.rmtree(directory, ignore_errors=True)
            os.replace(tmp, directory)
        return directory

    def report(self) -> dict[str, Any]:
        """What the store holds: bytes used and budget, blocks, and per variant its bytes alone (with its base)
        and whether it is complete; `independent_bytes`: what the complete variants would take stored whole."""
        manifests = self.manifests()
        with self._lock:
            variants: dict[str, dict[str, Any]] = {name: {"kind": m.kind, "base": m.base, "complete": self._complete(manifests, name),
                               "bytes": _alone_bytes(manifests, name)}
                        for name, m in sorted(manifests.items())}  # fmt: skip
            alone = sum(v["bytes"] for v in variants.values() if v["complete"])
            return {"budget_bytes": self.budget_bytes, "used_bytes": self.used_bytes, "blocks": len(self._sizes),
                    "pinned_blocks": len(self._pins), "variants": variants, "independent_bytes": alone}  # fmt: skip


def _alone_bytes(manifests: dict[str, Manifest], name: str) -> int:
    """Bytes of variant `name` with its base; of what is listed, where a base's manifest is missing."""
    try:
        return sum(required_digests(manifests, {name}).values())
    except ConfigError:
        return manifests[name].size_bytes
