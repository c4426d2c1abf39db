"""Cut a model directory or a peft adapter directory into blocks and publish them into a store.

A model's weights are grouped by decoder layer (`layer.N`: every tensor whose name holds `.layers.N.`) and by
part (`embed`, `norm`, `head`, `other`); each group is written as a safetensors file of exactly its tensors, in
float32 as stored, so equal tensors give equal bytes and the same digest: a fine-tune that froze its bottom
layers shares those layers' blocks with its base. Every other file of the directory (config, tokenizer) is a
file block. An adapter directory is two file blocks (adapter_config.json, adapter_model.safetensors).
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from edgellm.blocks.manifest import BlockRef, Manifest
from edgellm.blocks.store import BlockStore, sha256_bytes
from edgellm.errors import ConfigError, ModelError
from edgellm.progress import Phase

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_WEIGHT_FILES = re.compile(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?")
_SKIP = {"edgellm.json"}  # the converter's completion marker: not part of the model
_SKIP_SUFFIXES = (".gguf",)  # a GGUF a model was converted from (kept beside it by the converter): not needed
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def tensor_group(name: str) -> str:
    """The block a weight belongs to: `layer.N`, `embed`, `norm`, `head` or `other`."""
    match = _LAYER.search(name)
    if match:
        return f"layer.{int(match.group(1))}"
    if "embed_tokens" in name or name.endswith(("wte.weight", "wpe.weight")):
        return "embed"
    if name.startswith("lm_head"):
        return "head"
    if re.search(r"(^|\.)(norm|ln_f)\.", name):
        return "norm"
    return "other"


def publish_model(store: BlockStore, model_dir: Path, name: str) -> Manifest:
    """Put model directory `model_dir` into `store` as variant `name` (kind model) and return its manifest.

    Raises:
        ModelError: no safetensors weights in the directory.
    """
    from safetensors.torch import save

    from edgellm.store.weights import SafetensorsSource

    blocks: list[BlockRef] = []
    for path in sorted(model_dir.iterdir()):
        if (
            path.is_file()
            and not _WEIGHT_FILES.fullmatch(path.name)
            and path.name not in _SKIP
            and not path.name.endswith(_SKIP_SUFFIXES)
        ):
            blocks.append(_put(store, path.name, path.read_bytes()))
    with SafetensorsSource(model_dir) as source:
        groups: dict[str, list[str]] = defaultdict(list)
        for tensor in source.names():
            groups[tensor_group(tensor)].append(tensor)
        with Phase(f"publish {name}", total=len(groups), unit="blocks") as phase:
            for group, names in sorted(groups.items()):
                data = save({n: source(n).contiguous() for n in sorted(names)})
                blocks.append(_put(store, group, data, tuple(sorted(names))))
                phase.advance()
    manifest = Manifest(name, "model", tuple(blocks))
    store.add_manifest(manifest)
    return manifest


def publish_adapter(store: BlockStore, adapter_dir: Path, name: str, base: str) -> Manifest:
    """Put peft adapter directory `adapter_dir` into `store` as variant `name` of model `base`.

    Raises:
        ConfigError: the directory lacks adapter_config.json or adapter_model.safetensors.
    """
    missing = [f for f in ADAPTER_FILES if not (adapter_dir / f).is_file()]
    if missing:
        raise ConfigError(f"{adapter_dir} is not a peft adapter directory: no {', '.join(missing)}")
    blocks = tuple(_put(store, f, (adapter_dir / f).read_bytes()) for f in ADAPTER_FILES)
    manifest = Manifest(name, "adapter", blocks, base=base)
    store.add_manifest(manifest)
    return manifest


def _put(store: BlockStore, name: str, data: bytes, tensors: tuple[str, ...] = ()) -> BlockRef:
    digest = sha256_bytes(data)
    if not store.put(digest, data):  # cannot happen: the digest is of these bytes
        raise ModelError(f"block {name} of {len(data)} B was not stored")
    return BlockRef(digest, len(data), "tensors" if tensors else "file", name, tensors)
