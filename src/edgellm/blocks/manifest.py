"""A model variant as a manifest of content-addressed blocks (pure: no files, no torch).

A block is a file's bytes, named by their SHA-256 (`digest`). Two kinds of block:

- `file`: a file of the variant's directory as it is (config.json, the tokenizer, a LoRA adapter's
  adapter_model.safetensors); `name` is its file name.
- `tensors`: one group of a model's weights (`layer.3`: every tensor of decoder layer 3; `embed`, `norm`, `head`,
  `other`), written as a safetensors file of exactly those tensors; `name` is the group and `tensors` the names.

A variant of kind `adapter` applies to the variant named by `base` (kind `model`); holding it means holding both.
The manifest's JSON is the format nodes exchange and keep (`FORMAT`, `VERSION`); `from_json` rejects unknown
fields, bad digests and duplicate names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from edgellm.errors import ConfigError

FORMAT = "edgellm-manifest"
VERSION = 1
KINDS = ("model", "adapter")
BLOCK_KINDS = ("file", "tensors")
DIGEST = re.compile(r"[0-9a-f]{64}")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")  # one path component: no '/', never '..'


@dataclass(frozen=True)
class BlockRef:
    """One block of a variant: its digest (SHA-256 hex of its bytes), size, kind, and what it holds."""

    digest: str
    size_bytes: int
    kind: str
    name: str
    tensors: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.digest, str) or not DIGEST.fullmatch(self.digest):
            raise ConfigError(f"block digest must be 64 lowercase hex digits, got {str(self.digest)[:80]!r}")
        if not isinstance(self.size_bytes, int) or isinstance(self.size_bytes, bool) or self.size_bytes < 0:
            raise ConfigError(f"block {self.digest[:12]}: size_bytes must be an int >= 0, got {self.size_bytes!r}")
        if self.kind not in BLOCK_KINDS:
            raise ConfigError(f"block {self.digest[:12]}: unknown kind {self.kind!r}; choose from {BLOCK_KINDS}")
        if not isinstance(self.name, str) or not FILE_NAME.fullmatch(self.name):
            raise ConfigError(f"block {self.digest[:12]}: bad name {str(self.name)[:80]!r}")
        if (self.kind == "tensors") != bool(self.tensors):
            raise ConfigError(f"block {self.name!r}: a tensors block lists its tensors, a file block none")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"digest": self.digest, "size_bytes": self.size_bytes, "kind": self.kind,
                               "name": self.name}  # fmt: skip
        if self.tensors:
            out["tensors"] = list(self.tensors)
        return out

    @classmethod
    def from_json(cls, data: object) -> BlockRef:
        if not isinstance(data, dict):
            raise ConfigError(f"a block must be an object, got {type(data).__name__}")
        unknown = set(data) - {"digest", "size_bytes", "kind", "name", "tensors"}
        if unknown:
            raise ConfigError(f"unknown block fields {sorted(unknown)}")
        tensors = data.get("tensors", [])
        if not isinstance(tensors, list) or not all(isinstance(t, str) for t in tensors):
            raise ConfigError("block field 'tensors' must be a list of names")
        missing = {"digest", "size_bytes", "kind", "name"} - set(data)
        if missing:
            raise ConfigError(f"block misses fields {sorted(missing)}")
        return cls(data["digest"], data["size_bytes"], data["kind"], data["name"], tuple(tensors))


@dataclass(frozen=True)
class Manifest:
    """A model variant: its name, kind, the variant it applies to (adapters), and its blocks."""

    name: str
    kind: str
    blocks: tuple[BlockRef, ...]
    base: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not NAME.fullmatch(self.name):
            raise ConfigError(f"not a variant name: {str(self.name)[:80]!r} (letters, digits, '.', '_', '-')")
        if self.kind not in KINDS:
            raise ConfigError(f"variant {self.name!r}: unknown kind {self.kind!r}; choose from {KINDS}")
        if (self.kind == "adapter") != (self.base is not None):
            raise ConfigError(f"variant {self.name!r}: an adapter names its base model, a model names none")
        if self.base is not None and (not isinstance(self.base, str) or not NAME.fullmatch(self.base)):
            raise ConfigError(f"variant {self.name!r}: bad base name {str(self.base)[:80]!r}")
        names = [b.name for b in self.blocks]
        if len(set(names)) != len(names):
            raise ConfigError(f"variant {self.name!r}: duplicate block names")
        tensor_names = [t for b in self.blocks for t in b.tensors]
        if len(set(tensor_names)) != len(tensor_names):
            raise ConfigError(f"variant {self.name!r}: a tensor is in two blocks")

    @property
    def digests(self) -> frozenset[str]:
        return frozenset(b.digest for b in self.blocks)

    @property
    def size_bytes(self) -> int:
        """Bytes of its distinct blocks (a block listed twice counts once)."""
        return sum({b.digest: b.size_bytes for b in self.blocks}.values())

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "name": self.name, "kind": self.kind, "base": self.base,
                "blocks": [b.to_json() for b in self.blocks]}  # fmt: skip

    @classmethod
    def from_json(cls, data: object) -> Manifest:
        """Raises ConfigError naming what is wrong: another format or version, an unknown field, a bad block."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ConfigError(f"not an edgellm manifest (format must be {FORMAT!r})")
        if data.get("version") != VERSION:
            raise ConfigError(f"manifest version {data.get('version')!r}; this edgellm reads {VERSION}")
        unknown = set(data) - {"format", "version", "name", "kind", "base", "blocks"}
        if unknown:
            raise ConfigError(f"unknown manifest fields {sorted(unknown)}")
        blocks = data.get("blocks")
        if not isinstance(blocks, list):
            raise ConfigError("manifest field 'blocks' must be a list")
        return cls(data.get("name"), data.get("kind"), tuple(BlockRef.from_json(b) for b in blocks),  # type: ignore[arg-type]
                   data.get("base"))  # fmt: skip


def required_digests(manifests: dict[str, Manifest], names: set[str] | frozenset[str]) -> dict[str, int]:
    """{digest: size} of every block the variants `names` need, their bases' included.

    Raises:
        ConfigError: a name (or a base) with no manifest in `manifests`.
    """
    out: dict[str, int] = {}
    for name in sorted(names):
        for manifest in lineage(manifests, name):
            out.update({b.digest: b.size_bytes for b in manifest.blocks})
    return out


def lineage(manifests: dict[str, Manifest], name: str) -> list[Manifest]:
    """The variant `name` and the model it applies to (adapters), itself first."""
    chain: list[Manifest] = []
    current: str | None = name
    while current is not None:
        manifest = manifests.get(current)
        if manifest is None:
            raise ConfigError(f"no manifest for variant {current!r}; known: {sorted(manifests) or 'none'}")
        if manifest in chain:
            raise ConfigError(f"variant {name!r}: its bases form a cycle")
        chain.append(manifest)
        current = manifest.base
    return chain
