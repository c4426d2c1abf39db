"""What a node emulates (a slower processor, a smaller memory) and the memory budget its stage hosts keep.

A node of a topology may stand for a weaker machine than the one it runs on (docs/TOPOLOGY.md, "Node
capabilities"): `NodeEmulation` says how much slower its stage computations are (`compute_scale`) and how much
memory its whole process may hold (`memory_mb`). The memory budget is enforced before the node loads its stages
and after (`edgellm.deploy.memory_budget`: it refuses to start when they would not fit), and while it serves: every
new session reserves its KV cache for the deployment's `max_context` tokens in the node's `MemoryLedger`, which
refuses a session that would pass the budget with a `BusyError` instead of letting the process grow until it is
killed.

`rss_bytes` measures the process itself (resident set size): it lives here, below `deploy` and `serve`, because
stage servers and the device report it too.
"""

from __future__ import annotations

import math
import resource
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgellm.errors import BusyError, ConfigError

MB = 1_000_000  # memory_mb counts in 10^6 bytes, as the topology file does


def rss_bytes(field: str = "VmRSS") -> int:
    """Resident set size of this process now (`VmRSS`) or its peak so far (`VmHWM`), in bytes.

    Reads /proc/self/status (Linux). Where /proc is absent it falls back to the peak RSS of `resource.getrusage`
    (kilobytes on Linux, bytes on macOS), which can only overstate the current size. (`getrusage` is not used on
    Linux for the peak either: a child process starts with its parent's.)
    """
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024  # "VmRSS:   773660 kB"
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def release_freed_memory() -> None:
    """Hand memory freed since the last call back to the OS, so RSS measures what is live: collect garbage, then
    (glibc) `malloc_trim(0)`. Loading a stage frees large staging buffers that glibc otherwise keeps mapped."""
    import contextlib
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: RSS then keeps what the allocator holds
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def to_mb(nbytes: int | float) -> float:
    """Bytes -> MB (10^6 bytes), rounded to 0.1 for reports."""
    return round(nbytes / MB, 1)


@dataclass(frozen=True)
class NodeEmulation:
    """How a node emulates a weaker machine; echoed in every report it shapes (`to_json`).

    Attributes:
        compute_scale: the node's stage computations take this many times what they measure on this machine
            (>= 1.0; 1.0 is this machine's own speed). Relative to the machine running the emulation.
        memory_mb: the node process's whole memory budget in MB (10^6 bytes); None for no limit.
        preset: the named preset the numbers came from (`edgellm.deploy.presets.PRESETS`), None if none.
    """

    compute_scale: float = 1.0
    memory_mb: int | None = None
    preset: str | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.compute_scale) and self.compute_scale >= 1.0):
            raise ConfigError(f"compute_scale: must be a finite number >= 1.0, got {self.compute_scale}")
        if self.memory_mb is not None and self.memory_mb < 1:
            raise ConfigError(f"memory_mb: must be >= 1, got {self.memory_mb}")

    @property
    def budget_bytes(self) -> int | None:
        return None if self.memory_mb is None else self.memory_mb * MB

    def to_json(self) -> dict[str, Any]:
        return {"compute_scale": self.compute_scale, "memory_mb": self.memory_mb, "preset": self.preset}


class MemoryLedger:
    """A node process's memory budget and the KV-cache reservations its sessions hold against it. Thread-safe.

    What is free for sessions is `budget - baseline - activations`: `baseline_bytes` is the process's RSS measured
    once its stages are loaded (runtime + weights + whatever loading left behind), `activation_bytes` is kept for
    the largest forward pass (a prefill of `max_context` tokens). One ledger serves every stage host of a process.

    Args:
        node: the node's name, for messages.
        budget_bytes: the whole budget; None for no limit (reservations are still counted, for reports).
        baseline_bytes: RSS after loading.
        weight_bytes: the stages' weights (reported, already inside the baseline).
        activation_bytes: kept free for activations.
    """

    def __init__(
        self,
        node: str,
        budget_bytes: int | None,
        baseline_bytes: int,
        weight_bytes: int = 0,
        activation_bytes: int = 0,
    ) -> None:
        self.node = node
        self.budget_bytes = budget_bytes
        self.baseline_bytes = baseline_bytes
        self.weight_bytes = weight_bytes
        self.activation_bytes = activation_bytes
        self._reserved: dict[tuple[int, str], int] = {}
        self._lock = threading.Lock()

    @property
    def reserved_bytes(self) -> int:
        with self._lock:
            return sum(self._reserved.values())

    @property
    def sessions(self) -> int:
        """Sessions holding a reservation (one session on two stage hosts of the node counts once)."""
        with self._lock:
            return len({session for _, session in self._reserved})

    def reserve(self, key: tuple[int, str], nbytes: int, tokens: int) -> None:
        """Hold `nbytes` (a session's KV cache for `tokens` tokens) under `key`; replaces an earlier hold of `key`.

        Raises:
            BusyError: the reservation would pass the budget; the message names the node, the budget and what is
                held. Closing or expiring sessions frees room.
        """
        with self._lock:
            held = sum(b for k, b in self._reserved.items() if k != key)
            fixed = self.baseline_bytes + self.activation_bytes
            if self.budget_bytes is not None and fixed + held + nbytes > self.budget_bytes:
                others = len({session for k, session in self._reserved if k != key})
                raise BusyError(
                    f"{self.node}: a new session needs {to_mb(nbytes)} MB of KV cache for {tokens} tokens; "
                    f"{to_mb(held)} MB is reserved by {others} session(s) on top of {to_mb(self.baseline_bytes)} MB "
                    f"measured after loading + {to_mb(self.activation_bytes)} MB for activations, which leaves "
                    f"{to_mb(max(self.budget_bytes - fixed - held, 0))} MB of its memory_mb of "
                    f"{self.budget_bytes // MB}; retry when a session ends"
                )
            self._reserved[key] = nbytes

    def release(self, key: tuple[int, str]) -> None:
        """Drop the hold of `key` (a closed or expired session); unknown keys are ignored."""
        with self._lock:
            self._reserved.pop(key, None)

    def report(self) -> dict[str, Any]:
        """Measured RSS against the budget, in MB: what `Info` and the generation report show."""
        reserved, sessions = self.reserved_bytes, self.sessions
        return {
            "rss_mb": to_mb(rss_bytes()),
            "peak_rss_mb": to_mb(rss_bytes("VmHWM")),
            "budget_mb": None if self.budget_bytes is None else self.budget_bytes // MB,
            "baseline_mb": to_mb(self.baseline_bytes),
            "weights_mb": to_mb(self.weight_bytes),
            "activations_mb": to_mb(self.activation_bytes),
            "kv_reserved_mb": to_mb(reserved),
            "sessions": sessions,
        }


@dataclass(frozen=True)
class StageMemory:
    """What one stage host reserves per session in its node's ledger.

    Attributes:
        ledger: the node's ledger, shared by its stage hosts.
        kv_bytes_per_token: this stage's KV cache per token of one sequence (`quant.memory.kv_bytes_per_token`).
    """

    ledger: MemoryLedger
    kv_bytes_per_token: int
