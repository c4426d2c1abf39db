"""The block store: manifests, content addressing (a shared block stored once), integrity, budget and eviction."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from edgellm.blocks import BlockStore, Manifest
from edgellm.blocks.chunk import publish_adapter, publish_model, tensor_group
from edgellm.blocks.fetch import StoreSource, fetch_blocks
from edgellm.blocks.manifest import BlockRef, required_digests
from edgellm.blocks.store import sha256_bytes
from edgellm.errors import BusyError, ConfigError, PeerError
from edgellm.store.weights import SafetensorsSource


def du_bytes(root) -> int:
    """Bytes of the regular files under `root` (links not followed): what the store takes on disk."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def make_adapter(model_dir, out, seed: int):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft.get_peft_model(model, config).save_pretrained(out)
    return out


def frozen_bottom_finetune(model_dir, out, top_layer: int):
    """A copy of the model with layers >= top_layer changed (as a fine-tune that froze the layers below)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, out)
    tensors = load_file(out / "model.safetensors")
    for name, t in tensors.items():
        if tensor_group(name).startswith("layer.") and int(tensor_group(name)[6:]) >= top_layer:
            tensors[name] = t + 0.01
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_manifest_round_trips_and_rejects_bad_input():
    block = BlockRef("a" * 64, 10, "tensors", "layer.0", ("model.layers.0.w",))
    manifest = Manifest("lora-1", "adapter", (block,), base="base")
    assert Manifest.from_json(json.loads(json.dumps(manifest.to_json()))) == manifest
    with pytest.raises(ConfigError, match="64 lowercase hex"):
        BlockRef("xyz", 1, "file", "config.json")
    with pytest.raises(ConfigError, match="bad name"):
        BlockRef("a" * 64, 1, "file", "../etc/passwd")
    with pytest.raises(ConfigError, match="names its base"):
        Manifest("m", "adapter", ())
    with pytest.raises(ConfigError, match="unknown manifest fields"):
        Manifest.from_json({**manifest.to_json(), "extra": 1})
    with pytest.raises(ConfigError, match="version"):
        Manifest.from_json({**manifest.to_json(), "version": 9})
    with pytest.raises(ConfigError, match="no manifest for variant 'base'"):
        required_digests({"lora-1": manifest}, {"lora-1"})


def test_a_published_model_reads_back_tensor_for_tensor(tiny_chat_dir, tmp_path):
    store = BlockStore(tmp_path / "store")
    manifest = publish_model(store, tiny_chat_dir, "tiny")
    assert {b.name for b in manifest.blocks} >= {"config.json", "tokenizer.json", "embed", "norm", "layer.0"}
    view = store.view("tiny")
    with SafetensorsSource(tiny_chat_dir) as want, SafetensorsSource(view) as got:
        assert got.names() == want.names()
        for name in want.names():
            assert torch.equal(got(name), want(name)), name
    assert store.holds("tiny") and store.held() == ["tiny"]
    again = BlockStore(tmp_path / "store")  # a new process finds what the last one stored
    assert again.used_bytes == store.used_bytes and again.held() == ["tiny"]
    assert publish_model(BlockStore(tmp_path / "other"), tiny_chat_dir, "tiny").digests == manifest.digests


def test_a_block_shared_by_two_variants_is_stored_once(tiny_chat_dir, tmp_path):
    tuned = frozen_bottom_finetune(tiny_chat_dir, tmp_path / "tuned", top_layer=2)
    shared = BlockStore(tmp_path / "shared")
    base, fine = publish_model(shared, tiny_chat_dir, "base"), publish_model(shared, tuned, "tuned")
    common = base.digests & fine.digests
    names = {b.name for b in base.blocks if b.digest in common}
    assert {"layer.0", "layer.1", "embed"} <= names and "layer.2" not in names and "layer.3" not in names
    alone = [BlockStore(tmp_path / n) for n in ("a", "b")]
    publish_model(alone[0], tiny_chat_dir, "base")
    publish_model(alone[1], tuned, "tuned")
    common_bytes = sum(b.size_bytes for b in base.blocks if b.digest in common)
    assert shared.used_bytes == alone[0].used_bytes + alone[1].used_bytes - common_bytes
    objects = du_bytes(shared.root / "objects")  # measured on disk
    assert objects == shared.used_bytes < du_bytes(alone[0].root / "objects") + du_bytes(alone[1].root / "objects")
    report = shared.report()
    assert report["independent_bytes"] == alone[0].used_bytes + alone[1].used_bytes


def test_lora_variants_hold_their_base_once(tiny_chat_dir, tmp_path):
    store = BlockStore(tmp_path / "store")
    base = publish_model(store, tiny_chat_dir, "base")
    adapters = [publish_adapter(store, make_adapter(tiny_chat_dir, tmp_path / f"a{i}", i), f"lora-{i}", "base")
                for i in range(2)]  # fmt: skip
    assert store.held() == ["base", "lora-0", "lora-1"]
    configs = {b.digest for a in adapters for b in a.blocks if b.name == "adapter_config.json"}
    assert len(configs) == 1  # the same peft config: one block for both
    union = {b.digest: b.size_bytes for m in (base, *adapters) for b in m.blocks}
    assert store.used_bytes == sum(union.values()) < base.size_bytes + sum(a.size_bytes for a in adapters)
    assert store.report()["variants"]["lora-1"]["bytes"] == base.size_bytes + adapters[1].size_bytes
    view = store.view("lora-0")
    assert (view / "adapter_model.safetensors").read_bytes() == (tmp_path / "a0/adapter_model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="adapter directory"):
        publish_adapter(store, tmp_path, "x", "base")


def test_a_corrupt_block_is_refused_and_fetched_from_the_next_source(tiny_chat_dir, tmp_path):
    origin = BlockStore(tmp_path / "origin")
    manifest = publish_model(origin, tiny_chat_dir, "tiny")
    peer = BlockStore(tmp_path / "peer")
    fetch_blocks(peer, required_digests({"tiny": manifest}, {"tiny"}), [StoreSource(origin)])
    victim = max(manifest.blocks, key=lambda b: b.size_bytes)
    path = peer.path(victim.digest)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))  # a flipped bit on the peer's disk

    node = BlockStore(tmp_path / "node")
    node.add_manifest(manifest)
    report = fetch_blocks(node, node.missing({"tiny"}), [StoreSource(peer, "peer"), StoreSource(origin)])
    assert report.refused == [(victim.digest, "peer", "bytes do not match the digest")]
    assert report.fetched_bytes == {"peer": manifest.size_bytes - victim.size_bytes, "origin": victim.size_bytes}
    assert node.holds("tiny") and all(node.verify(d) for d in manifest.digests)
    assert not peer.verify(victim.digest) and not peer.has(victim.digest)  # the peer finds and drops its bad copy
    with pytest.raises(PeerError, match="could not be fetched intact"):
        fetch_blocks(BlockStore(tmp_path / "n2"), {victim.digest: victim.size_bytes}, [StoreSource(peer, "peer")])


def test_budget_retain_and_pins(tiny_chat_dir, tmp_path):
    origin = BlockStore(tmp_path / "origin")
    base = publish_model(origin, tiny_chat_dir, "base")
    tuned = publish_model(origin, frozen_bottom_finetune(tiny_chat_dir, tmp_path / "tuned", 3), "tuned")
    manifests = origin.manifests()
    union = sum(required_digests(manifests, {"base", "tuned"}).values())
    small = BlockStore(tmp_path / "small", budget_bytes=union - 1)
    for m in (base, tuned):
        small.add_manifest(m)
    with pytest.raises(BusyError, match="budget"):
        fetch_blocks(small, small.missing({"base", "tuned"}), [StoreSource(origin)])
    node = BlockStore(tmp_path / "node", budget_bytes=union)
    for m in (base, tuned):
        node.add_manifest(m)
    fetch_blocks(node, node.missing({"base", "tuned"}), [StoreSource(origin)])
    assert node.used_bytes == union and node.held() == ["base", "tuned"]
    own = tuned.digests - base.digests
    with node.pinned("tuned"):
        result = node.retain({"base"})
        assert result["evicted_bytes"] == 0 and result["dropped"] == ["tuned"]
        assert result["deferred_bytes"] == sum(b.size_bytes for b in tuned.blocks if b.digest in own)
        assert all(node.has(d) for d in own)  # a generation still uses them
    assert not any(node.has(d) for d in own) and node.held() == ["base"]
    assert node.used_bytes == base.size_bytes


def test_a_fetch_that_needs_room_waits_for_the_generation_holding_evicted_blocks(tiny_chat_dir, tmp_path):
    import threading
    import time

    origin = BlockStore(tmp_path / "origin")
    manifest = publish_model(origin, tiny_chat_dir, "base")
    node = BlockStore(tmp_path / "node", budget_bytes=manifest.size_bytes)
    node.add_manifest(manifest)
    fetch_blocks(node, node.missing({"base"}), [StoreSource(origin)])
    extra = b"x" * 1000
    release = threading.Event()

    def generation():
        with node.pinned("base"):
            release.wait(10)

    runner = threading.Thread(target=generation)
    runner.start()
    time.sleep(0.05)
    node.retain(set())  # every block is doomed, none removed yet: the generation holds them
    with pytest.raises(BusyError, match="still in use"):
        node.put(sha256_bytes(extra), extra)
    threading.Timer(0.2, release.set).start()
    started = time.monotonic()
    assert node.put(sha256_bytes(extra), extra, wait_s=10)
    assert 0.1 < time.monotonic() - started < 5 and node.used_bytes == len(extra)
    runner.join()
