"""The device's view of the deployment's LoRA adapters: which exist, which every stage holds, loaded on demand.

An adapter is a peft directory (`adapter_config.json` + `adapter_model.safetensors`: what `edgellm finetune`
exports and peft writes). The catalog knows adapters by name (each subdirectory of `--adapters DIR`, or added at
run time); a generation that names one has it loaded on every node first (each node keeps the tensors of its own
layers, `edgellm.adapters.AdapterStore`), and pins it while it runs. Loaded adapters are kept under a byte budget:
loading one more evicts the least recently used adapters no generation is using.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch

from edgellm.errors import BusyError, ConfigError
from edgellm.serve.generate_request import ADAPTER_NAME

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


class AdapterTarget(Protocol):
    """A node (or a local stage) that holds its layers' part of adapters."""

    name: str

    def load(self, name: str, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> int: ...

    def unload(self, name: str) -> None: ...


def read_adapter(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A peft adapter directory's config and tensors (file keys), as a node's store takes them.

    Raises:
        ConfigError: not a directory with both files, or files that do not parse.
    """
    from safetensors.torch import load_file

    config_path, weights = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not config_path.is_file() or not weights.is_file():
        raise ConfigError(f"{directory} is not a peft adapter: it needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        config = json.loads(config_path.read_text())
        tensors = load_file(str(weights))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{directory}: cannot read the adapter ({exc})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{config_path}: not a JSON object")
    return config, tensors


class AdapterCatalog:
    """Known and loaded adapters of a deployment, as its device sees them.

    Args:
        targets: every node (or local stage) holding a part of the model, in pipeline order.
        directory: each subdirectory holding a peft adapter is an adapter of that name; None: none known.
        budget_bytes: the most bytes of adapters kept loaded on the deployment (None: no bound); counted as the
            adapters' tensors in their files.
    """

    def __init__(
        self, targets: Sequence[AdapterTarget], directory: Path | None = None, budget_bytes: int | None = None
    ) -> None:
        if budget_bytes is not None and budget_bytes < 0:
            raise ConfigError(f"the adapter budget must be >= 0 bytes, got {budget_bytes}")
        self.targets = list(targets)
        self.budget_bytes = budget_bytes
        self._sources: dict[str, Path] = {}
        self._loaded: OrderedDict[str, int] = OrderedDict()  # name -> bytes, least recently used first
        self._pins: dict[str, int] = {}
        self._lock = threading.RLock()
        if directory is not None:
            if not directory.is_dir():
                raise ConfigError(f"adapter directory {directory} does not exist")
            for sub in sorted(directory.iterdir()):
                if (sub / CONFIG_FILE).is_file() and ADAPTER_NAME.fullmatch(sub.name):
                    self._sources[sub.name] = sub

    def listing(self) -> list[dict[str, Any]]:
        """Every known adapter: name, whether loaded, its bytes when loaded, where it comes from, pins."""
        with self._lock:
            return [{"name": name, "loaded": name in self._loaded, "bytes": self._loaded.get(name, 0),
                     "source": str(path), "in_use": self._pins.get(name, 0)}
                    for name, path in sorted(self._sources.items())]  # fmt: skip

    @property
    def loaded_bytes(self) -> int:
        return sum(self._loaded.values())

    def load(self, name: str, path: str | None = None) -> dict[str, Any]:
        """Add adapter `name` (from `path`, else the one already known) and load it on every node now.

        Raises:
            ConfigError: a bad name, an unknown adapter without a path, or a directory that is not an adapter
                (nothing changes then).
            BusyError: it does not fit the budget beside the adapters in use.
        """
        if not ADAPTER_NAME.fullmatch(name):
            raise ConfigError(f"not an adapter name: {name[:80]!r} (letters, digits, '.', '_', '-'; up to 64)")
        with self._lock:
            source = Path(path) if path is not None else self._sources.get(name)
            if source is None:
                raise ConfigError(f"unknown adapter {name!r}; known: {sorted(self._sources) or 'none'}")
            if name in self._loaded and self._sources.get(name) == source:
                self._loaded.move_to_end(name)
                return {"name": name, "loaded": True, "bytes": self._loaded[name]}
            config, tensors = read_adapter(source)
            if self._pins.get(name):
                raise BusyError(f"adapter {name!r} is in use by {self._pins[name]} generation(s); replace it later")
            size = sum(t.numel() * t.element_size() for t in tensors.values())
            self._make_room(size, name)
            loaded: list[AdapterTarget] = []
            try:
                for target in self.targets:
                    target.load(name, config, tensors)
                    loaded.append(target)
            except BaseException:
                for target in loaded:  # all nodes or none
                    self._quietly_unload(target, name)
                raise
            self._sources[name] = source
            self._loaded[name] = size
            self._loaded.move_to_end(name)
            log.info("adapter %s loaded on %d node(s): %.1f MB", name, len(self.targets), size / 1e6)
            return {"name": name, "loaded": True, "bytes": size}

    def unload(self, name: str) -> dict[str, Any]:
        """Unload adapter `name` from every node (it stays known).

        Raises:
            ConfigError: not loaded. BusyError: a generation uses it.
        """
        with self._lock:
            if name not in self._loaded:
                raise ConfigError(f"adapter {name!r} is not loaded; loaded: {list(self._loaded) or 'none'}")
            if self._pins.get(name):
                raise BusyError(f"adapter {name!r} is in use by {self._pins[name]} generation(s)")
            self._unload_everywhere(name)
            return {"name": name, "loaded": False}

    @contextmanager
    def use(self, name: str) -> Iterator[None]:
        """Load `name` where needed and keep it loaded (pinned) for the body: one generation with it."""
        with self._lock:
            self.load(name)
            self._pins[name] = self._pins.get(name, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._pins[name] -= 1
                if not self._pins[name]:
                    del self._pins[name]

    def _make_room(self, size: int, keep: str) -> None:
        if self.budget_bytes is None:
            return
        if size > self.budget_bytes:
            raise BusyError(f"adapter {keep!r} ({size / 1e6:.1f} MB) is larger than the adapter budget "
                            f"({self.budget_bytes / 1e6:.1f} MB)")  # fmt: skip
        for victim in list(self._loaded):
            if sum(b for n, b in self._loaded.items() if n != keep) + size <= self.budget_bytes:
                return
            if victim != keep and not self._pins.get(victim):
                log.info("adapter %s evicted (least recently used) to make room for %s", victim, keep)
                self._unload_everywhere(victim)
        if sum(b for n, b in self._loaded.items() if n != keep) + size > self.budget_bytes:
            raise BusyError(f"adapter {keep!r} does not fit the adapter budget of {self.budget_bytes / 1e6:.1f} MB "
                            f"beside the adapters in use ({sorted(self._pins)})")  # fmt: skip

    def _unload_everywhere(self, name: str) -> None:
        for target in self.targets:
            self._quietly_unload(target, name)
        self._loaded.pop(name, None)

    @staticmethod
    def _quietly_unload(target: AdapterTarget, name: str) -> None:
        try:
            target.unload(name)
        except Exception as exc:  # noqa: BLE001 - a node that lost it already (restarted) is not an error here
            log.warning("could not unload adapter %s from %s: %s", name, target.name, exc)
