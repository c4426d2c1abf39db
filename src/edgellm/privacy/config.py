"""What a differential-privacy defence is set to: one frozen config, shared by the CLI, the topology and the wire.

`DPConfig` describes one Gaussian mechanism and its accounting: the clipping bound and noise multiplier
(`edgellm.privacy.noise.GaussianRows`), the accountant's delta, an optional budget, an optional second bound for
the gradients a device sends back in split learning, and the noise's seed. Its JSON form (a generate request's
`dp` field, a topology link's `dp` table) uses the short keys of `DP_KEYS`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from edgellm.errors import ConfigError
from edgellm.privacy.noise import GaussianRows

DEFAULT_DELTA = 1e-5

# JSON / TOML key -> (field, what it is): a topology link's `dp = {clip = 4.0, noise = 0.5}`, a request's `dp`.
DP_KEYS = {
    "clip": ("clip_norm", "L2 bound of each row"),
    "noise": ("noise_multiplier", "noise std / clip"),
    "delta": ("delta", "the accountant's delta"),
    "max_epsilon": ("max_epsilon", "budget: refuse a release past it"),
    "grad_clip": ("grad_clip_norm", "split learning: also clip and noise the gradients sent back"),
    "seed": ("seed", "the noise's seed (reproducible, not secret)"),
}


@dataclass(frozen=True)
class DPConfig:
    """A Gaussian mechanism on rows (or on an adapter update) and its privacy accounting.

    Attributes:
        clip_norm: each row is clipped to this L2 norm (the mechanism's sensitivity).
        noise_multiplier: the noise std is `noise_multiplier * clip_norm` (Opacus' convention); 0 clips only
            (no privacy: epsilon is infinite).
        delta: the delta of the (epsilon, delta) the accountant reports.
        max_epsilon: a budget: a release that would take epsilon past it is refused before anything is sent;
            None: no budget (epsilon is only reported).
        grad_clip_norm: split learning: clip each row of the gradient the device sends back to this norm and add
            noise of std `noise_multiplier * grad_clip_norm`; None: gradients go back as computed.
        seed: seeds the noise (reproducible runs, tests); None draws it from the operating system, which is what
            a real defence needs (a known seed lets whoever knows it subtract the noise).
    """

    clip_norm: float
    noise_multiplier: float
    delta: float = DEFAULT_DELTA
    max_epsilon: float | None = None
    grad_clip_norm: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        GaussianRows(self.clip_norm, self.noise_multiplier)  # validates both
        if not 0 < self.delta < 1:
            raise ConfigError(f"the DP delta must lie in (0, 1), got {self.delta}")
        if self.max_epsilon is not None and not (self.max_epsilon > 0 and math.isfinite(self.max_epsilon)):
            raise ConfigError(f"the DP budget (max epsilon) must be a positive finite number, got {self.max_epsilon}")
        if self.grad_clip_norm is not None:
            GaussianRows(self.grad_clip_norm, self.noise_multiplier)
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ConfigError(f"the DP seed must be an integer in [0, 2**63), got {self.seed}")

    @property
    def rows(self) -> GaussianRows:
        """The mechanism on smashed-data rows."""
        return GaussianRows(self.clip_norm, self.noise_multiplier)

    @property
    def grad_rows(self) -> GaussianRows | None:
        """The mechanism on the gradient rows sent back, or None when they are not protected."""
        return None if self.grad_clip_norm is None else GaussianRows(self.grad_clip_norm, self.noise_multiplier)

    def generator(self, salt: int = 0) -> torch.Generator:
        """A generator for this mechanism's noise: seeded from `seed` (+ `salt`), else from the OS."""
        gen = torch.Generator()
        if self.seed is None:
            gen.seed()
        else:
            gen.manual_seed((self.seed + salt) % (2**63))
        return gen

    def to_json(self) -> dict[str, Any]:
        """The short-key form (`DP_KEYS`), without the fields left at None."""
        out = {key: getattr(self, name) for key, (name, _) in DP_KEYS.items()}
        return {key: value for key, value in out.items() if value is not None}

    @classmethod
    def from_json(cls, data: Any, where: str = "dp") -> DPConfig:
        """Parse the short-key form; `where` names it in errors (e.g. `links[0].dp`).

        Raises:
            ConfigError: not an object, an unknown key, a wrong type or a value out of range, naming it.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"{where} must be a table/object of {sorted(DP_KEYS)}, got {type(data).__name__}")
        unknown = set(data) - set(DP_KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; valid: {sorted(DP_KEYS)}")
        for key in ("clip", "noise"):
            if key not in data:
                raise ConfigError(f"{where} needs {key!r} ({DP_KEYS[key][1]})")
        values: dict[str, Any] = {}
        for key, value in data.items():
            name = DP_KEYS[key][0]
            if key == "seed":
                if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                    raise ConfigError(f"{where}.seed must be an integer, got {value!r}")
            elif value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise ConfigError(f"{where}.{key} must be a number, got {value!r}")
            values[name] = float(value) if key != "seed" and value is not None else value
        try:
            return cls(**values)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None


@dataclass(frozen=True)
class TrainPrivacy:
    """The defences of one fine-tuning client.

    Attributes:
        smashed: clip and noise the hidden states the device sends to the servers (and, with its
            `grad_clip_norm`, the gradients it sends back); None: off.
        fedavg: DP-FedAvg of the device-side adapters (clip each update, noise at aggregation); None: off.
    """

    smashed: DPConfig | None = None
    fedavg: DPConfig | None = None

    def __post_init__(self) -> None:
        if self.fedavg is not None and self.fedavg.grad_clip_norm is not None:
            raise ConfigError("DP-FedAvg protects adapter updates; a gradient bound (grad_clip) means nothing there")
