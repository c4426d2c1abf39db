"""Federated averaging of adapter states: a pure function, as flower's aggregation strategies are."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from edgellm.errors import ConfigError


def fedavg(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """The weighted mean `sum_i w_i * s_i / sum_i w_i` of each tensor, accumulated in float32.

    Args:
        states: the clients' adapter states (same keys and shapes), e.g. from `adapter_state`.
        weights: one non-negative weight per state, typically its number of training examples.

    Returns:
        key -> averaged tensor, in the dtype of the first state's tensor.

    Raises:
        ConfigError: no states, a count mismatch, a negative or non-finite weight, a non-positive total weight,
            or states whose keys or shapes differ (naming the key).
    """
    if not states:
        raise ConfigError("fedavg needs at least one state")
    if len(weights) != len(states):
        raise ConfigError(f"fedavg got {len(weights)} weights for {len(states)} states")
    for i, w in enumerate(weights):
        if not math.isfinite(w) or w < 0:
            raise ConfigError(f"fedavg weight {i} is {w}; weights must be finite and >= 0")
    total = float(sum(weights))
    if total <= 0:
        raise ConfigError(f"fedavg weights sum to {total}; at least one must be > 0")
    keys = set(states[0])
    for i, state in enumerate(states[1:], start=1):
        if set(state) != keys:
            diff = sorted(keys.symmetric_difference(state))
            raise ConfigError(f"fedavg state {i} has different keys from state 0, e.g. {diff[0]!r}")
    out: dict[str, torch.Tensor] = {}
    for key in sorted(keys):
        first = states[0][key]
        acc = torch.zeros(first.shape, dtype=torch.float32, device=first.device)
        for i, (state, w) in enumerate(zip(states, weights)):
            if state[key].shape != first.shape:
                raise ConfigError(
                    f"fedavg tensor {key} has shape {tuple(state[key].shape)} in state {i}, "
                    f"{tuple(first.shape)} in state 0"
                )
            acc += float(w) * state[key].detach().to(first.device, torch.float32)
        out[key] = (acc / total).to(first.dtype)
    return out
