"""Removing cached things: only inside edgellm's cache folders, never through a link that leads out of them."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from edgellm.errors import ConfigError
from edgellm.store import paths
from edgellm.store.inventory import ModelRow


def cache_folders() -> tuple[Path, ...]:
    """The folders whose contents `edgellm models rm` and `edgellm cache clean` may remove."""
    return (paths.models_dir(), paths.quant_dir(), paths.profiles_dir(), paths.kernels_dir(), paths.checkpoint_root())


def removal_refusal(path: Path, roots: Sequence[Path]) -> str | None:
    """Why `path` must not be removed, or None when it may: it lies strictly inside one of the cache folders
    `roots` once every link above it is resolved (a folder itself linked elsewhere is fine), and, if it is itself
    a link, that link points inside the same folder (only the link is removed then, never what it points to)."""
    parent = path.parent.resolve()
    for root in (r.resolve() for r in roots):
        if path.name in ("", ".", "..") or not (parent == root or parent.is_relative_to(root)):
            continue
        if path.is_symlink():
            target = path.resolve()
            if target == root or not target.is_relative_to(root):
                return f"{path} is a link to {target}, outside the cache; remove the link yourself"
        return None
    return f"{path} is not inside the cache folders ({', '.join(str(r) for r in roots)})"


def remove_entry(path: Path, roots: Sequence[Path]) -> None:
    """Remove the file, link or folder `path` of the cache (a link: the link only).

    Raises:
        ConfigError: `path` is outside the cache folders `roots`, or a link leading out of them.
    """
    reason = removal_refusal(path, roots)
    if reason is not None:
        raise ConfigError(reason)
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)  # does not follow links inside the tree: it removes the links themselves


def find_model(rows: list[ModelRow], name: str) -> ModelRow:
    """The cached model `name` among `rows` (`inventory.model_rows`).

    Raises:
        ConfigError: nothing of that name is cached (the message lists what is).
    """
    for row in rows:
        if row.name == name and row.paths:
            return row
    cached = [r.name for r in rows if r.paths]
    known = f"cached: {', '.join(cached)}" if cached else "nothing is cached"
    if any(r.name == name for r in rows):
        raise ConfigError(f"model {name!r} is not in the cache ({known})")
    raise ConfigError(f"no cached model {name!r} ({known})")


def remove_model(row: ModelRow, roots: Sequence[Path]) -> int:
    """Remove a model's folder and its quantized stages (`row.paths`); returns the bytes freed.

    Every path is checked before any is removed, so a refusal leaves the model whole.

    Raises:
        ConfigError: a path is outside the cache folders `roots`, or a link leading out of them.
    """
    for path in row.paths:
        reason = removal_refusal(path, roots)
        if reason is not None:
            raise ConfigError(reason)
    for path in row.paths:
        remove_entry(path, roots)
    return row.total_bytes
