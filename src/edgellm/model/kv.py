"""A stage's per-session KV cache.

Keys and values live in preallocated buffers that double when full, so a decode step appends in place instead
of concatenating. Writes go past the committed length and become visible only on `commit()`: a forward pass
that fails half-way leaves the cache exactly as it was.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from edgellm.errors import ConfigError

MIN_CAPACITY = 64


class RowsCache(Protocol):
    """A cache whose rows each continue their own session at their own length (`edgellm.engine.slots`)."""

    def begin_attention(self, token_mask: torch.Tensor) -> torch.Tensor: ...  # [B, S] -> mask [B, 1, S, T]

    def positions(self, new: int) -> torch.Tensor: ...  # [B, new]: each row's next places (= its key indices)

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, kwargs: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def commit(self) -> None: ...

    def rollback(self) -> None: ...


def capacity_for(length: int) -> int:
    """Tokens a cache's buffers hold once a session reaches `length`: the smallest power-of-two multiple of
    `MIN_CAPACITY` that is >= `length` (the buffers double when full)."""
    capacity = MIN_CAPACITY
    while capacity < length:
        capacity *= 2
    return capacity


class KVCache:
    """Keys and values of decoder layers `[first_layer, first_layer + num_layers)` for one session.

    Implements the one method of transformers' `Cache` that attention modules call (`update`), keyed by the
    block's global layer index.

    Args:
        first_layer: global index of the first layer this cache serves.
        num_layers: number of consecutive layers.
        max_length: longest sequence allowed (the position-encoding limit); longer raises.
    """

    def __init__(self, first_layer: int, num_layers: int, max_length: int | None = None) -> None:
        self.first_layer = first_layer
        self.num_layers = num_layers
        self.max_length = max_length
        self.length = 0  # committed tokens
        self._pending = 0  # tokens of the forward pass in progress
        self._keys: list[torch.Tensor | None] = [None] * num_layers  # each [B, H_kv, capacity, D_h]
        self._values: list[torch.Tensor | None] = [None] * num_layers
        self._valid: torch.Tensor | None = None  # [B, capacity] bool: key is a real token, not padding

    @property
    def batch_size(self) -> int | None:
        return None if self._valid is None else self._valid.shape[0]

    def begin(self, token_mask: torch.Tensor) -> torch.Tensor:
        """Start a forward pass over `S` new tokens; returns the validity of all keys it will attend to.

        token_mask: [B, S] bool (True = real token) -> [B, length + S] bool
        """
        batch, new = token_mask.shape
        total = self.length + new
        if self.max_length is not None and total > self.max_length:
            raise ConfigError(f"sequence of {total} tokens exceeds this model's limit of {self.max_length}")
        if self._valid is None:
            self._valid = torch.zeros(batch, capacity_for(total), dtype=torch.bool)
        elif batch != self._valid.shape[0]:
            raise ConfigError(f"session has batch size {self._valid.shape[0]}, request has {batch}")
        elif total > self._valid.shape[1]:
            self._valid = _grow(self._valid, dim=1, capacity=capacity_for(total))
        self._valid[:, self.length : total] = token_mask
        self._pending = new
        return self._valid[:, :total]

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, kwargs: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this pass's keys/values for one layer; returns all keys/values so far.

        key, value: [B, H_kv, S, D_h] -> ([B, H_kv, length + S, D_h], same)
        """
        i = layer_idx - self.first_layer
        if not 0 <= i < self.num_layers:
            raise IndexError(f"layer {layer_idx} is not in this cache's range")
        total = self.length + key.shape[2]
        self._keys[i] = _write(self._keys[i], key, self.length, total)
        self._values[i] = _write(self._values[i], value, self.length, total)
        return self._keys[i][:, :, :total], self._values[i][:, :, :total]  # type: ignore[index]

    def commit(self) -> None:
        """Make the keys written by the current pass part of the session."""
        self.length += self._pending
        self._pending = 0

    def rollback(self) -> None:
        """Forget the keys written by the current (failed) pass."""
        self._pending = 0
        if self.length == 0:  # nothing committed yet: the failed pass must not fix the session's batch size
            self._keys = [None] * self.num_layers
            self._values = [None] * self.num_layers
            self._valid = None

    def truncate(self, length: int) -> None:
        """Drop every key after the first `length` tokens (speculative decoding, replay)."""
        if not 0 <= length <= self.length:
            raise ConfigError(f"cannot truncate a cache of {self.length} tokens to {length}")
        self.length = length

    def has_padding(self) -> bool:
        """Whether any committed key is padding (a left-padded batch): such a session is never batched with others."""
        return self._valid is not None and not bool(self._valid[:, : self.length].all())

    def nbytes(self) -> int:
        """Bytes held by the buffers (allocated capacity, not just the used part)."""
        tensors = [t for t in self._keys + self._values if t is not None]
        if self._valid is not None:
            tensors.append(self._valid)
        return sum(t.numel() * t.element_size() for t in tensors)


def _grow(buffer: torch.Tensor, dim: int, capacity: int) -> torch.Tensor:
    shape = list(buffer.shape)
    shape[dim] = capacity
    bigger = buffer.new_zeros(shape)
    bigger.narrow(dim, 0, buffer.shape[dim]).copy_(buffer)
    return bigger


def _write(buffer: torch.Tensor | None, new: torch.Tensor, start: int, end: int) -> torch.Tensor:
    # new: [B, H, S, D]; buffer: [B, H, capacity, D]
    if buffer is None:
        shape = list(new.shape)
        shape[2] = capacity_for(end)
        buffer = new.new_zeros(shape)
    elif end > buffer.shape[2]:
        buffer = _grow(buffer, dim=2, capacity=capacity_for(end))
    buffer[:, :, start:end] = new
    return buffer
