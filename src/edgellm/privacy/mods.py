"""Differential privacy as "mods" on the device side of a link: wrappers around the next call (flower's idea).

`RowGuard` is the mechanism with its ledger: it charges the ledger (refusing past the budget) and only then
clips and noises the rows. `PrivateHop` wraps the device's hop that carries its smashed data to the first server:
every `ForwardRequest` it sends has its hidden states guarded first; everything else passes through. With DP off
nothing is wrapped, so the pipeline is exactly today's.

The accountant and the privacy unit: `edgellm.privacy.accountant`.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from typing import Any

import torch

from edgellm.errors import ConfigError
from edgellm.net.messages import CloseSession, ForwardReply, ForwardRequest
from edgellm.privacy.accountant import PrivacyLedger
from edgellm.privacy.config import DPConfig
from edgellm.privacy.noise import GaussianRows, gaussian_rows


class RowGuard:
    """Clip and noise rows, charging a ledger one release per row. Thread-safe (one device, many sessions).

    Args:
        mechanism: the clipping bound and noise multiplier.
        ledger: where releases are charged (and refused past its budget).
        generator: the noise's random source (`DPConfig.generator`).
    """

    def __init__(self, mechanism: GaussianRows, ledger: PrivacyLedger, generator: torch.Generator) -> None:
        self.mechanism = mechanism
        self.ledger = ledger
        self._generator = generator
        self._lock = threading.Lock()

    @classmethod
    def for_rows(cls, config: DPConfig, mechanism: str = "smashed_data") -> RowGuard:
        """The guard of a config's smashed-data rows, with a fresh ledger."""
        ledger = PrivacyLedger(mechanism, config.clip_norm, config.noise_multiplier, config.delta, config.max_epsilon)
        return cls(config.rows, ledger, config.generator())

    @classmethod
    def for_gradients(cls, config: DPConfig) -> RowGuard | None:
        """The guard of the gradients sent back (split learning), or None when the config leaves them alone."""
        if config.grad_rows is None:
            return None
        grad = config.grad_rows
        ledger = PrivacyLedger("gradients", grad.clip_norm, grad.noise_multiplier, config.delta, config.max_epsilon)
        return cls(grad, ledger, config.generator(salt=1))

    def release(self, rows: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Charge the ledger for the real rows, then clip and noise every row (differentiable in `rows`).

        rows: [..., D] float, token_mask: [B, S] bool | None (False = padding, not charged) -> [..., D]

        Raises:
            PrivacyBudgetSpent: the budget would be passed; nothing is released (the caller sends nothing).
        """
        if not rows.is_floating_point():
            raise ConfigError(
                "differential privacy guards hidden states, but this device sends token ids (a thin device): "
                'give the device the first layers (a first cut above 0) or the embedding (embed = "device")'
            )
        count = int(token_mask.sum()) if token_mask is not None else rows[..., 0].numel()
        with self._lock:
            self.ledger.charge(count)
            return gaussian_rows(rows, self.mechanism, self._generator)


class PrivateHop:
    """A hop whose outgoing hidden states are guarded: the device's hop to its first server.

    Everything but `forward` (close, probe, info, handler, route, ...) is the wrapped hop's.
    """

    def __init__(self, hop: Any, guard: RowGuard) -> None:
        self.name = hop.name
        self.inner = hop
        self.guard = guard

    def forward(self, request: ForwardRequest) -> ForwardReply:
        # hidden: [B, S, D] -> the same, clipped and noised; refused (raising) before the inner hop sees it
        data = self.guard.release(request.data, request.token_mask)
        return self.inner.forward(dataclasses.replace(request, data=data))

    def close(self, request: CloseSession) -> None:
        self.inner.close(request)

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (during unpickling): never recurse
            raise AttributeError(name)
        return getattr(self.inner, name)


def private_hops(hops: Sequence[Any], guard: RowGuard | None, index: int = 1) -> list[Any]:
    """`hops` with hop `index` (the one carrying the device's first smashed data) wrapped; as-is without a guard.

    The device's later hops need no guard: in star mode they carry what a server computed from already noised
    rows (post-processing costs no privacy), and server->server traffic never passes the device.

    Raises:
        ConfigError: there is no such hop (no server to send to).
    """
    out = list(hops)
    if guard is None:
        return out
    if not 0 <= index < len(out):
        raise ConfigError("differential privacy needs a link to guard: this run sends nothing off the device")
    out[index] = PrivateHop(out[index], guard)
    return out
