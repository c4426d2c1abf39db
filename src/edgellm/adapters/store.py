"""`AdapterStore`: the LoRA adapters one stage holds, each batch row of a forward pass running its own.

    store = AdapterStore(stage, budget_bytes=64 << 20)
    store.load_dir("alice", Path("adapters/alice"))      # a peft directory: keeps this stage's layers only
    slot = store.acquire("alice")                         # pinned while a session uses it
    with store.rows([slot, -1, slot]):                    # row 1 runs the base model
        h = stage(x, positions, cache)
    store.release(slot)

Nothing is merged into the base: the targeted linears of the stage's blocks are wrapped, on first use, in
`MultiLoraLinear`, which adds each row's delta (`edgellm.adapters.bgmv`). Slots are small integers, reused after
an unload; each wrapped module holds a stack of exactly the adapters it has.

Not thread-safe: one forward pass at a time per stage (the stage host runs them under its lock); `rows` sets the
plan on the stage's wrappers for the duration of its block, and loads or unloads must not run during one.
"""

from __future__ import annotations

import contextlib
import re
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgellm.adapters.bgmv import RowPlan, plan_rows
from edgellm.adapters.multi_linear import MultiLoraLinear
from edgellm.adapters.stage_adapter import StageAdapter, stage_adapter
from edgellm.errors import BusyError, ConfigError
from edgellm.lora.config import LoraSpec
from edgellm.lora.peft_io import load_peft_adapter
from edgellm.model.stage import Stage

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


@dataclass
class _Held:
    """One loaded adapter (mutable: its pin count changes)."""

    name: str
    slot: int
    spec: LoraSpec
    layers: tuple[int, ...]
    nbytes: int
    modules: list[tuple[int, str]]  # (block index, name in block) of the modules it adapts in this stage
    pins: int = 0


class AdapterStore:
    """The LoRA adapters one stage holds, applied per row of a batch without merging them into the base.

    Memory: an adapter costs the A and B tensors of the stage's layers it adapts, in the stage's float dtype
    (`load` returns that number, `nbytes` sums it). The stacks are allocated at exactly the adapters held, so
    device memory grows by that much per adapter; where ranks differ, the smaller ones are zero-padded to the
    largest in each module's stack, which is not counted.

    Not thread-safe: run one forward pass of the stage at a time (the host's lock), and no load or unload during
    one; `rows` only sets each wrapper's plan for its block.

    Args:
        stage: the stage whose blocks the adapters apply to (wrappers a previous store left are emptied).
        budget_bytes: the most adapter bytes held at once; loading past it evicts the least recently used
            unpinned adapters (use: load, acquire, a pass in `rows`). None: no limit.

    Raises:
        ConfigError: a negative budget.
    """

    def __init__(self, stage: Stage, budget_bytes: int | None = None) -> None:
        if budget_bytes is not None and (isinstance(budget_bytes, bool) or budget_bytes < 0):
            raise ConfigError(f"adapter budget_bytes must be >= 0 or None, got {budget_bytes!r}")
        self.stage = stage
        self.budget_bytes = budget_bytes
        self._held: OrderedDict[str, _Held] = OrderedDict()  # least recently used first
        self._by_slot: dict[int, _Held] = {}
        self._wrappers: dict[tuple[int, str], MultiLoraLinear] = {}  # (block index, name in block) -> wrapper
        self._depth = 0  # nesting of `rows` blocks
        for block_index, block in enumerate(stage.blocks):
            for sub, module in block.named_modules():
                if isinstance(module, MultiLoraLinear):
                    module.clear()
                    self._wrappers[block_index, sub] = module

    # -- loading -------------------------------------------------------------------------------------------------

    def load(self, name: str, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> int:
        """Install adapter `name` from a peft adapter_config dict and its tensors; -> the bytes held for it.

        Keys may be peft's file form "base_model.model.<module>.lora_A.weight" or the in-memory form
        "<module>.lora_A.weight". Only the tensors of this stage's layers (`spec.start..spec.end`) are kept: a stage
        holding none of the adapter's layers holds it with 0 bytes. An adapter of the same name is replaced (its
        slot kept). Past `budget_bytes`, the least recently used unpinned adapters are evicted first.

        Raises:
            ConfigError: a bad name, or bad input naming the field or key (see `stage_adapter`); the store is left
                unchanged.
            BusyError: `name` is pinned, or the adapter cannot fit the budget even after evicting every unpinned
                one; nothing is evicted then.
        """
        _check_name(name)
        old = self._held.get(name)
        if old is not None and old.pins:
            raise BusyError(f"adapter {name!r} is in use by {old.pins} session(s); it cannot be replaced now")
        part = stage_adapter(self.stage, config, tensors)
        for victim in self._victims(part.nbytes, name):
            self._drop(victim)
        slot = old.slot if old is not None else self._free_slot()
        if old is not None:
            self._drop(old)
        self._install(name, slot, part)
        return part.nbytes

    def load_dir(self, name: str, directory: Path) -> int:
        """`load` from a peft adapter directory (`adapter_config.json` + `adapter_model.safetensors`), as
        `edgellm finetune` exports it or peft's `save_pretrained` writes it.

        Raises:
            ConfigError: a missing or unreadable file, an unsupported option (naming the file and field), or as
                `load`.
            BusyError: as `load`.
        """
        spec, tensors = load_peft_adapter(Path(directory))
        config = {
            "peft_type": "LORA",
            "r": spec.r,
            "lora_alpha": spec.alpha,
            "target_modules": list(spec.target_modules),
        }
        return self.load(name, config, tensors)

    def unload(self, name: str) -> None:
        """Drop adapter `name`, freeing its slot and memory.

        Raises:
            ConfigError: no such adapter (the message names the loaded ones).
            BusyError: sessions still use it.
        """
        held = self._get(name)
        if held.pins:
            raise BusyError(f"adapter {name!r} is in use by {held.pins} session(s); release it before unloading")
        self._drop(held)

    # -- sessions and passes -------------------------------------------------------------------------------------

    def acquire(self, name: str | None) -> int:
        """Pin adapter `name` for a session (it is neither evicted nor unloaded until released); -> its slot.

        None -> -1 (the base model; nothing pinned).

        Raises:
            ConfigError: `name` is not loaded (the message names the loaded ones).
        """
        if name is None:
            return -1
        held = self._get(name)
        held.pins += 1
        self._held.move_to_end(name)
        return held.slot

    def release(self, slot: int) -> None:
        """Unpin one `acquire` of `slot`; -1 does nothing.

        Raises:
            ConfigError: `slot` is not a loaded adapter's, or is not pinned.
        """
        if slot == -1:
            return
        held = self._by_slot.get(slot)
        if held is None or held.pins == 0:
            raise ConfigError(f"adapter slot {slot} is not acquired; acquired: {self._acquired()}")
        held.pins -= 1

    @contextlib.contextmanager
    def rows(self, slots: Sequence[int] | torch.Tensor) -> Iterator[None]:
        """Within the block every forward pass of the stage applies adapter `slots[b]` to batch row b (-1: none).

        slots: B ints (a list or a [B] int tensor), each -1 or a loaded adapter's slot.

        Raises:
            ConfigError: a slot no loaded adapter has.
        """
        index = [int(s) for s in (slots.tolist() if isinstance(slots, torch.Tensor) else slots)]
        unknown = sorted({s for s in index if s != -1 and s not in self._by_slot})
        if unknown:
            raise ConfigError(f"adapter slots {unknown} are not loaded; loaded: {self._slot_names()}")
        for s in dict.fromkeys(s for s in index if s >= 0):
            self._held.move_to_end(self._by_slot[s].name)
        if self._depth == 0 and all(s < 0 for s in index):
            yield  # nothing to set: outside a block every wrapper is without a plan
            return
        saved = [(w, w.plan) for w in self._wrappers.values()]
        plans: dict[tuple[int, ...], RowPlan | None] = {}
        for wrapper in self._wrappers.values():
            key = tuple(wrapper.slots)  # wrappers holding the same adapters in the same order share one plan
            if key not in plans:
                position = {slot: i for i, slot in enumerate(key)}
                plans[key] = plan_rows([position.get(s, -1) for s in index], wrapper.device())
            wrapper.plan = plans[key]
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            for wrapper, plan in saved:
                wrapper.plan = plan

    # -- reports -------------------------------------------------------------------------------------------------

    def listing(self) -> list[dict[str, Any]]:
        """One dict per adapter, by name: name, slot, bytes, rank, alpha, targets, pinned (sessions), layers."""
        return [
            {
                "name": h.name,
                "slot": h.slot,
                "bytes": h.nbytes,
                "rank": h.spec.r,
                "alpha": h.spec.alpha,
                "targets": list(h.spec.target_modules),
                "pinned": h.pins,
                "layers": list(h.layers),
            }
            for h in sorted(self._held.values(), key=lambda h: h.name)
        ]

    @property
    def nbytes(self) -> int:
        """Bytes of the adapters held (their A and B tensors of this stage's layers)."""
        return sum(h.nbytes for h in self._held.values())

    def names(self) -> list[str]:
        """The loaded adapters' names, sorted."""
        return sorted(self._held)

    # -- internals -----------------------------------------------------------------------------------------------

    def _get(self, name: str) -> _Held:
        held = self._held.get(name)
        if held is None:
            raise ConfigError(f"adapter {name!r} is not loaded on this stage; loaded: {self.names()}")
        return held

    def _victims(self, nbytes: int, name: str) -> list[_Held]:
        """The least recently used unpinned adapters to evict so that `nbytes` more fit (replacing `name`)."""
        if self.budget_bytes is None:
            return []
        if nbytes > self.budget_bytes:
            raise BusyError(f"adapter {name!r} needs {nbytes} bytes, more than the budget of {self.budget_bytes}")
        used = self.nbytes - (self._held[name].nbytes if name in self._held else 0)
        victims = []
        for held in self._held.values():
            if used + nbytes <= self.budget_bytes:
                break
            if held.name != name and held.pins == 0:
                victims.append(held)
                used -= held.nbytes
        if used + nbytes > self.budget_bytes:
            raise BusyError(
                f"adapter {name!r} needs {nbytes} bytes; {used} of the budget of {self.budget_bytes} are held by "
                f"adapters in use ({self._acquired()})"
            )
        return victims

    def _free_slot(self) -> int:
        slot = 0
        while slot in self._by_slot:
            slot += 1
        return slot

    def _install(self, name: str, slot: int, part: StageAdapter) -> None:
        for delta in part.modules:
            key = (delta.block, delta.sub)
            wrapper = self._wrappers.get(key)
            if wrapper is None:
                block = self.stage.blocks[delta.block]
                wrapper = MultiLoraLinear(block.get_submodule(delta.sub))
                block.set_submodule(delta.sub, wrapper)
                self._wrappers[key] = wrapper
            wrapper.put(slot, delta.a, delta.b)
        held = _Held(name, slot, part.spec, part.layers, part.nbytes, [(d.block, d.sub) for d in part.modules])
        self._held[name] = held
        self._by_slot[slot] = held

    def _drop(self, held: _Held) -> None:
        for module in held.modules:
            self._wrappers[module].drop(held.slot)
        del self._held[held.name], self._by_slot[held.slot]

    def _acquired(self) -> list[str]:
        return [f"{h.name} x{h.pins}" for h in self._held.values() if h.pins]

    def _slot_names(self) -> dict[int, str]:
        return {slot: h.name for slot, h in sorted(self._by_slot.items())}


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(
            f"adapter name must be 1-128 letters, digits, '_', '.' or '-' (not starting with '_', '.' or '-'), "
            f"got {name!r}"
        )
