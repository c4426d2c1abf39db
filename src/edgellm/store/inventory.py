"""What edgellm's home folder holds: models and their quantized stages, profiles, kernels, checkpoints, leftovers.

`scan_cache` reads the disk once into plain records (`CacheScan`); everything `edgellm models list` and
`edgellm cache info|clean` show or remove is a pure function of those records (`model_rows`, `sections`,
`clean_targets`), tested on literal scans and on fake cache folders.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from edgellm.store import paths
from edgellm.store.convert import MARKER

# Kinds of cached things, in the order `edgellm cache info` lists them. `partial`: what an interrupted model pull
# or conversion left behind.
KINDS = ("models", "quant", "profiles", "kernels", "checkpoints", "partial")
REBUILT = ("quant", "profiles", "kernels", "partial")  # edgellm makes these again when it needs them
_STAGE_FILE = re.compile(
    r"(?P<scheme>.+?)(?:-r(?P<rules>[0-9a-f]{8}))?-L(?P<start>\d+)-(?P<end>\d+)(?P<parts>(?:\+embed)?(?:\+head)?)"
    r"\.safetensors"
)


@dataclass(frozen=True)
class Entry:
    """One file or folder in a cache, as removed as a whole.

    Attributes:
        path: where it is. size_bytes: the files' sizes, summed (links count nothing).
        mtime_s: its newest modification time (a leftover still being written is recent).
    """

    path: Path
    size_bytes: int
    mtime_s: float = 0.0


@dataclass(frozen=True)
class ModelDir:
    """A folder of the models cache: complete when the conversion's marker is there; `provenance` is the marker.
    `link`: where the folder points when it is a link to another folder (its size then counts nothing here)."""

    entry: Entry
    complete: bool
    quant_key: str
    provenance: dict[str, str] = field(default_factory=dict)
    link: Path | None = None

    @property
    def name(self) -> str:
        return self.entry.path.name


@dataclass(frozen=True)
class CacheScan:
    """Everything under the home folder, by kind. `quant` maps a model's quant key to its folder and stage files;
    `other` is what edgellm does not know (listed, never removed)."""

    home: Path
    models: tuple[ModelDir, ...] = ()
    quant: dict[str, tuple[Entry, tuple[Entry, ...]]] = field(default_factory=dict)
    profiles: tuple[Entry, ...] = ()
    kernels: tuple[Entry, ...] = ()
    checkpoints: tuple[Entry, ...] = ()
    partial: tuple[Entry, ...] = ()
    other: tuple[Entry, ...] = ()


@dataclass(frozen=True)
class QuantVariant:
    """A model's stages quantized with one scheme (and one set of rules): `stages` as `L0-3+embed`."""

    scheme: str
    stages: tuple[str, ...]
    size_bytes: int


@dataclass(frozen=True)
class ModelRow:
    """One line of `edgellm models list`.

    Attributes:
        name: what `edgellm models rm` takes. kind: "registered", "gguf" (converted from a .gguf file),
            "directory" (another model folder in the cache) or "quant-only" (quantized stages of a model that
            is not in the cache: a folder elsewhere, or an older conversion).
        state: "cached", "not pulled" or "incomplete". source: the wheel or .gguf it came from, when known.
        paths: what `models rm` removes: the model folder and its quantized stages' folder.
    """

    name: str
    kind: str
    state: str
    size_bytes: int
    variants: tuple[QuantVariant, ...]
    paths: tuple[Path, ...]
    source: str = ""

    @property
    def total_bytes(self) -> int:
        return self.size_bytes + sum(v.size_bytes for v in self.variants)


def tree_entry(path: Path) -> Entry:
    """`path` with its size (regular files only, links not followed) and newest modification time."""
    try:
        top = path.lstat()
    except FileNotFoundError:
        return Entry(path, 0, 0.0)
    if not path.is_dir() or path.is_symlink():
        return Entry(path, top.st_size if path.is_file() and not path.is_symlink() else 0, top.st_mtime)
    size, newest = 0, top.st_mtime
    for folder, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            try:
                st = os.lstat(os.path.join(folder, name))
            except FileNotFoundError:  # removed while we looked
                continue
            newest = max(newest, st.st_mtime)
            if name in files and not os.path.islink(os.path.join(folder, name)):
                size += st.st_size
    return Entry(path, size, newest)


def _children(folder: Path) -> list[Path]:
    return sorted(folder.iterdir()) if folder.is_dir() and not folder.is_symlink() else []


def scan_cache(home: Path | None = None) -> CacheScan:
    """Read the home folder (default: `paths.home()`) into a `CacheScan`."""
    home = paths.home() if home is None else home
    known = {"models", "quant", "profiles", "kernels", "checkpoints"}
    models, partial = [], []
    other = [tree_entry(p) for p in _children(home) if p.name not in known]
    for child in _children(home / "models"):
        if child.name.startswith("."):
            partial.append(tree_entry(child))
        elif child.is_dir():
            marker = child / MARKER
            link = child.resolve() if child.is_symlink() else None
            key = paths.quant_model_key(child)
            models.append(ModelDir(tree_entry(child), marker.is_file(), key, _read_marker(marker), link))
        else:  # a stray file or a dangling link: listed, never removed
            other.append(tree_entry(child))
    quant = {d.name: (tree_entry(d), tuple(tree_entry(f) for f in _children(d))) for d in _children(home / "quant")}
    return CacheScan(
        home=home,
        models=tuple(models),
        quant=quant,
        profiles=tuple(tree_entry(p) for p in _children(home / "profiles")),
        kernels=tuple(tree_entry(p) for p in _children(home / "kernels")),
        checkpoints=tuple(tree_entry(p) for p in _children(home / "checkpoints")),
        partial=tuple(partial),
        other=tuple(other),
    )


def _read_marker(marker: Path) -> dict[str, str]:
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def quant_variants(files: tuple[Entry, ...]) -> tuple[QuantVariant, ...]:
    """Stage files grouped by scheme (and rules); files that are not stages (leftovers) count under "other"."""
    groups: dict[str, tuple[list[str], int]] = {}
    for f in files:
        m = _STAGE_FILE.fullmatch(f.path.name)
        scheme = "other" if m is None else m["scheme"] + (f" [rules {m['rules']}]" if m["rules"] else "")
        stage = f.path.name if m is None else f"L{m['start']}-{m['end']}{m['parts']}"
        stages, size = groups.get(scheme, ([], 0))
        groups[scheme] = ([*stages, stage], size + f.size_bytes)
    return tuple(QuantVariant(s, tuple(sorted(st)), size) for s, (st, size) in sorted(groups.items()))


def model_rows(scan: CacheScan, registered: list[str]) -> list[ModelRow]:
    """Every model `edgellm models list` shows: the registered ones (pulled or not), every other folder of the
    models cache, and quantized stages whose model is not in the cache; each with its size and variants."""
    by_name = {m.name: m for m in scan.models}
    rows = []
    for name in [*registered, *sorted(n for n in by_name if n not in registered)]:
        kind = "registered" if name in registered else "gguf" if name.startswith("gguf-") else "directory"
        found = by_name.get(name)
        rows.append(ModelRow(name, kind, "not pulled", 0, (), ()) if found is None else _model_row(scan, found, kind))
    claimed = {m.quant_key for m in scan.models}
    for key, (folder, files) in sorted(scan.quant.items()):
        if key not in claimed:
            rows.append(ModelRow(key, "quant-only", "cached", 0, quant_variants(files), (folder.path,)))
    return rows


def _model_row(scan: CacheScan, found: ModelDir, kind: str) -> ModelRow:
    folder, files = scan.quant.get(found.quant_key, (None, ()))
    source = f"link to {found.link}" if found.link else found.provenance.get("wheel") or found.provenance.get("gguf")
    return ModelRow(
        name=found.name,
        kind=kind,
        state="cached" if found.complete else "incomplete",
        size_bytes=found.entry.size_bytes,
        variants=quant_variants(files),
        paths=(found.entry.path, *([folder.path] if folder else [])),
        source=source or "",
    )


def sections(scan: CacheScan) -> dict[str, tuple[Entry, ...]]:
    """The removable entries of each kind (`KINDS`): a model folder, a model's quant folder, a file..."""
    return {
        "models": tuple(m.entry for m in scan.models),
        "quant": tuple(folder for folder, _ in scan.quant.values()),
        "profiles": scan.profiles,
        "kernels": scan.kernels,
        "checkpoints": scan.checkpoints,
        "partial": scan.partial,
    }


def parse_kinds(spec: list[str] | None) -> tuple[str, ...]:
    """`--what` values -> kinds to clean. None: what edgellm rebuilds by itself (`REBUILT`); "all": every kind
    but models, which are only removed when named.

    Raises:
        ValueError: an unknown kind (the message names the valid ones).
    """
    if not spec:
        return REBUILT
    kinds: list[str] = []
    for part in (p.strip() for item in spec for p in item.split(",")):
        if part == "all":
            kinds.extend(k for k in KINDS if k != "models")
        elif part in KINDS:
            kinds.append(part)
        elif part:
            raise ValueError(f"unknown cache kind {part!r}; choose from {[*KINDS, 'all']}")
    return tuple(dict.fromkeys(kinds))


def clean_targets(
    scan: CacheScan, kinds: tuple[str, ...], now_s: float, busy_s: float = 3600.0
) -> tuple[list[tuple[str, Entry]], list[Entry]]:
    """What `edgellm cache clean` removes: (kind, entry) pairs, and the leftovers it keeps because they changed
    less than `busy_s` ago (a pull or conversion may still be writing them)."""
    chosen, kept = [], []
    for kind, entries in sections(scan).items():
        if kind not in kinds:
            continue
        for entry in entries:
            if kind == "partial" and now_s - entry.mtime_s < busy_s:
                kept.append(entry)
            else:
                chosen.append((kind, entry))
    return chosen, kept


def human_bytes(n: int) -> str:
    """A size for people: `0 B`, `512 B`, `12.3 kB`, `1.20 MB`, `3.40 GB` (powers of 1000, as `du --si`)."""
    if n < 1000:
        return f"{n} B"
    units = ("kB", "MB", "GB", "TB")
    value, power = n / 1000, 0
    while round(value, 1) >= 1000 and power < len(units) - 1:
        value, power = value / 1000, power + 1
    return f"{value:.2f} {units[power]}" if round(value, 2) < 10 else f"{value:.1f} {units[power]}"
