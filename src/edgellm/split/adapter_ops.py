"""LoRA adapters on a node's stage, through the control channel: the ops and the device's two kinds of target.

Ops a stage server answers (`register_adapter_ops`):
- `adapter_load` (`name`, `config`: the peft adapter_config object, `tensors`: base64 of a safetensors file of
  the adapter's tensors, only those of this node's layers needed): `{"name", "bytes"}` held by the stage;
- `adapter_unload` (`name`): `{"name"}`;
- `adapters`: `{"adapters": [...]}`, the stage store's listing.

Adapter weights always travel losslessly (safetensors bytes), whatever the link's codec.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch

from edgellm.errors import ConfigError
from edgellm.split.budget import release_freed_memory
from edgellm.split.control import ControlOps, Field

_LAYER = re.compile(r"\.layers\.(\d+)\.")


class Store(Protocol):
    """A stage's adapter store (`edgellm.adapters.AdapterStore`), as these ops use it."""

    def load(self, name: str, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> int: ...

    def unload(self, name: str) -> None: ...

    def listing(self) -> list[dict[str, Any]]: ...


class Host(Protocol):
    """A stage host with an adapter store: loading changes the stage's modules, so it waits for the host's
    computation lock (no pass may run half with the old adapters and half with the new)."""

    adapters: Any  # a `Store`, or None
    lock: Any  # a threading.RLock


def _store(host: Host | None) -> Store:
    store = None if host is None else host.adapters
    if store is None:
        raise ConfigError("this node's stage holds no adapters")
    return store  # type: ignore[no-any-return]


def pack_tensors(tensors: Mapping[str, torch.Tensor]) -> str:
    """Tensors -> base64 text of their safetensors bytes (lossless)."""
    from safetensors.torch import save

    return base64.b64encode(save({k: v.contiguous() for k, v in tensors.items()})).decode("ascii")


def unpack_tensors(text: str) -> dict[str, torch.Tensor]:
    """`pack_tensors`' text -> tensors. Raises ConfigError on anything that does not parse."""
    from safetensors.torch import load

    try:
        return load(base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError, RuntimeError) as exc:
        raise ConfigError(f"adapter tensors do not parse as base64 safetensors: {exc}") from None


def layer_tensors(tensors: Mapping[str, torch.Tensor], start: int, end: int) -> dict[str, torch.Tensor]:
    """The tensors of decoder layers [start, end) (and any not tied to a layer)."""
    out = {}
    for key, tensor in tensors.items():
        match = _LAYER.search(key)
        if match is None or start <= int(match.group(1)) < end:
            out[key] = tensor
    return out


def register_adapter_ops(ops: ControlOps, host: Callable[[], Host | None]) -> None:
    """Add `adapter_load`, `adapter_unload` and `adapters` on the stage host `host()` returns (read per call: a
    reconfiguration replaces it)."""

    def load(request: dict[str, Any]) -> dict[str, Any]:
        tensors = unpack_tensors(request["tensors"])
        nbytes = LocalAdapterTarget("", host()).load(request["name"], request["config"], tensors)
        return {"name": request["name"], "bytes": nbytes}

    def unload(request: dict[str, Any]) -> dict[str, Any]:
        LocalAdapterTarget("", host()).unload(request["name"])
        return {"name": request["name"]}

    def held() -> Store:
        return _store(host())

    ops.register("adapter_load", load, {"name": Field(str, required=True), "config": Field(dict, required=True),
                                        "tensors": Field(str, required=True)})  # fmt: skip
    ops.register("adapter_unload", unload, {"name": Field(str, required=True)})
    ops.register("adapters", lambda _: {"adapters": held().listing()})


class LocalAdapterTarget:
    """A stage host in this process: its store, changed between two of the host's passes."""

    def __init__(self, name: str, host: Host | None) -> None:
        self.name, self.host = name, host

    def load(self, name: str, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> int:
        store = _store(self.host)
        with self.host.lock:  # type: ignore[union-attr]
            nbytes = store.load(name, config, tensors)
        release_freed_memory()  # the stacks the store rebuilt: RSS then grows by the adapter's own size
        return nbytes

    def unload(self, name: str) -> None:
        store = _store(self.host)
        with self.host.lock:  # type: ignore[union-attr]
            store.unload(name)
        release_freed_memory()


class RemoteAdapterTarget:
    """A server holding layers [start, end), reached by control calls; sent only its layers' tensors."""

    def __init__(self, name: str, control: Callable[[dict[str, Any]], dict[str, Any]], start: int, end: int) -> None:
        self.name, self._control, self.start, self.end = name, control, start, end

    def load(self, name: str, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> int:
        own = layer_tensors(tensors, self.start, self.end)
        reply = self._control({"op": "adapter_load", "name": name, "config": dict(config),
                               "tensors": pack_tensors(own)})  # fmt: skip
        return int(reply.get("bytes", 0))

    def unload(self, name: str) -> None:
        self._control({"op": "adapter_unload", "name": name})
