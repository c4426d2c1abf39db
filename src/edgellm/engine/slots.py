"""A stage's static KV cache with slots: preallocated once, one slot per session, each at its own length.

One forward pass runs a batch of rows, each row the next tokens of the session in one slot, so a decode step
serves several sessions at once, each at its own position (what continuous batching is built on). The buffers
never grow or move: `keys[layer]` is `[slots, H_kv, capacity, D_h]` for the stage's whole life.

Use: `batch = cache.rows(slot_ids)` is the cache object a `Stage.forward` takes for rows `slot_ids` (one
session's prompt, or one new token of each of several sessions); the pass appends at each slot's own length
and, like `KVCache`, makes the keys visible only on `commit()`, so a failed pass leaves every slot as it was.
"""

from __future__ import annotations

from typing import Any

import torch

from edgellm.errors import ConfigError
from edgellm.model.stage import Stage


class SlotCache:
    """Keys and values of decoder layers `[first_layer, first_layer + num_layers)` for up to `slots` sessions.

    Args:
        slots: sessions it holds at once.
        capacity: the longest session, in tokens.
        kv_heads, head_dim: the attention's key/value heads and their size.
    """

    def __init__(
        self, first_layer: int, num_layers: int, slots: int, capacity: int, kv_heads: int, head_dim: int,
        dtype: torch.dtype = torch.float32,
    ) -> None:  # fmt: skip
        if slots < 1 or capacity < 1:
            raise ConfigError(f"a slot cache needs slots >= 1 and capacity >= 1, got {slots} and {capacity}")
        self.first_layer, self.num_layers, self.capacity = first_layer, num_layers, capacity
        shape = (slots, kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.lengths = torch.zeros(slots, dtype=torch.long)  # committed tokens per slot

    @classmethod
    def for_stage(cls, stage: Stage, config: Any, slots: int, capacity: int) -> SlotCache:
        """A slot cache sized for `stage`'s layers of a model with Hugging Face `config`."""
        heads = int(getattr(config, "num_attention_heads", 0) or config.n_head)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or int(config.hidden_size) // heads)
        spec = stage.spec
        return cls(spec.start, spec.num_layers, slots, capacity, kv_heads, head_dim, stage.dtype)

    @property
    def slots(self) -> int:
        return self.lengths.shape[0]

    def rows(self, slot_ids: torch.Tensor | list[int]) -> SlotRows:
        """The cache of one forward pass whose row b continues the session in slot `slot_ids[b]`."""
        ids = torch.as_tensor(slot_ids, dtype=torch.long).view(-1)
        if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= self.slots:
            raise ConfigError(f"slot ids must lie in 0..{self.slots - 1}, got {ids.tolist()}")
        if ids.unique().numel() != ids.numel():
            raise ConfigError(f"a pass may continue each slot once, got {ids.tolist()}")
        return SlotRows(self, ids)

    def reset(self, slot: int) -> None:
        """Free a slot for a new session (its old keys stay in the buffer, hidden by its length of 0)."""
        self.lengths[slot] = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


class SlotRows:
    """The rows of one forward pass over a `SlotCache`: what `Stage.forward` takes as its cache.

    Rows may be at different lengths: row b's new tokens go at positions `[lengths[b], lengths[b] + S)` of its
    slot, and each attends to its own slot's keys up to itself.
    """

    def __init__(self, cache: SlotCache, slot_ids: torch.Tensor) -> None:
        self.cache, self.slot_ids = cache, slot_ids
        self.starts = cache.lengths[slot_ids].clone()  # [B]
        self._new = 0
        self._total = 0  # keys a row may see in this pass: max(starts) + S

    def positions(self, new: int) -> torch.Tensor:
        """The positions of the next `new` tokens of every row, for `Stage.forward`: [B, new] int64."""
        return self.starts.view(-1, 1) + torch.arange(new).view(1, -1)

    def begin_attention(self, token_mask: torch.Tensor) -> torch.Tensor:
        """Start a pass over `S` new tokens per row; returns its attention mask over the slots' keys.

        token_mask: [B, S] bool (True everywhere: slots hold no padding) -> [B, 1, S, T] bool (True = attend)
        """
        batch, new = token_mask.shape
        if batch != self.slot_ids.numel():
            raise ConfigError(f"{batch} rows for {self.slot_ids.numel()} slots")
        if not bool(token_mask.all()):
            raise ConfigError("a slot cache takes no padding: give each session its own row")
        if int(self.starts.max()) + new > self.cache.capacity:
            raise ConfigError(f"a session would pass the slot capacity of {self.cache.capacity} tokens")
        self._new, self._total = new, int(self.starts.max()) + new
        query = self.starts.view(-1, 1) + torch.arange(new).view(1, -1)  # [B, S] absolute positions
        keys = torch.arange(self._total).view(1, 1, -1)  # [1, 1, T]
        return (keys <= query.unsqueeze(-1)).unsqueeze(1)  # [B, 1, S, T]

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, kwargs: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this pass's keys/values of one layer into the rows' slots; return each row's first T keys.

        key, value: [B, H_kv, S, D_h] -> ([B, H_kv, T, D_h], same)
        """
        i = layer_idx - self.cache.first_layer
        if not 0 <= i < self.cache.num_layers:
            raise IndexError(f"layer {layer_idx} is not in this cache's range")
        positions = self.starts.view(-1, 1) + torch.arange(key.shape[2]).view(1, -1)  # [B, S]
        rows = self.slot_ids.view(-1, 1).expand_as(positions)
        # Advanced indices on dims 0 and 2 around a slice put the indexed dims first: [B, S, H_kv, D_h].
        self.cache.keys[i][rows, :, positions] = key.transpose(1, 2).to(self.cache.keys[i].dtype)
        self.cache.values[i][rows, :, positions] = value.transpose(1, 2).to(self.cache.values[i].dtype)
        return self.cache.keys[i][self.slot_ids, :, : self._total], self.cache.values[i][
            self.slot_ids, :, : self._total
        ]

    def commit(self) -> None:
        self.cache.lengths[self.slot_ids] = self.starts + self._new
        self.starts = self.cache.lengths[self.slot_ids].clone()
        self._new = 0

    def rollback(self) -> None:
        self._new = 0  # the lengths never moved: what the pass wrote is beyond them, hidden
