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


def update_norm(state: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of the update `state - start` over every tensor together (float32).

    Raises:
        ConfigError: `start` lacks a key of `state`.
    """
    missing = sorted(set(state) - set(start))
    if missing:
        raise ConfigError(f"the round's start has no tensor {missing[0]!r} to measure the update against")
    total = torch.zeros((), dtype=torch.float32)
    for key in sorted(state):
        diff = state[key].detach().float() - start[key].detach().float()
        total += diff.pow(2).sum()
    return float(total.sqrt())


def clip_update(
    state: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor], clip_norm: float
) -> dict[str, torch.Tensor]:
    """`state` with its update from `start` scaled down to L2 norm <= `clip_norm` (all tensors together).

    A state within the bound is returned as it is (the same tensors, no arithmetic), so clipping never changes
    an update it does not have to: DP-FedAvg with a large bound and no noise is FedAvg exactly.
    """
    if not clip_norm > 0 or not math.isfinite(clip_norm):
        raise ConfigError(f"the DP-FedAvg clipping norm must be a positive finite number, got {clip_norm}")
    norm = update_norm(state, start)
    if norm <= clip_norm:
        return dict(state)
    scale = clip_norm / norm
    out = {}
    for key, value in state.items():
        base = start[key].detach().float()
        out[key] = (base + (value.detach().float() - base) * scale).to(value.dtype)
    return out


def dp_fedavg(
    states: Sequence[Mapping[str, torch.Tensor]],
    clip_norm: float,
    noise_multiplier: float,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """DP-FedAvg's aggregation (McMahan et al. 2018): the equal-weight mean of the clients' clipped states plus
    N(0, (noise_multiplier * clip_norm / n)^2) on every value, n = len(states).

    The states must already be clipped relative to the round's common start (`clip_update`, which each client
    applies before sending): the mean of n states within `clip_norm` of one start moves by at most
    `clip_norm / n` when one client is added or removed, so this noise is the Gaussian mechanism with multiplier
    `noise_multiplier` on the sum. With `noise_multiplier` 0 it is `fedavg(states, [1] * n)` exactly.

    Raises:
        ConfigError: as `fedavg`, or a negative or non-finite noise multiplier.
    """
    if not noise_multiplier >= 0 or not math.isfinite(noise_multiplier):
        raise ConfigError(f"the DP-FedAvg noise multiplier must be finite and >= 0, got {noise_multiplier}")
    mean = fedavg(states, [1.0] * len(states))
    if noise_multiplier == 0:
        return mean
    std = noise_multiplier * clip_norm / len(states)
    out = {}
    for key in sorted(mean):  # a fixed order, so a seeded generator gives the same noise per key
        value = mean[key]
        noise = torch.randn(value.shape, generator=generator, dtype=torch.float32) * std
        out[key] = (value.float() + noise).to(value.dtype)
    return out
