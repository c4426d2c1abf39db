"""The Gaussian mechanism on rows of smashed data (pure tensor functions).

Each row (one token's hidden state) is clipped to L2 norm <= `clip_norm`, then Gaussian noise of standard deviation
`noise_multiplier * clip_norm` is added to every value, as Opacus does for gradients (std = multiplier x bound).
The privacy unit and its accounting are in `edgellm.privacy.accountant` and docs/PRIVACY.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgellm.errors import ConfigError


@dataclass(frozen=True)
class GaussianRows:
    """Per-row clipping bound and noise multiplier. `noise_multiplier` 0 clips only."""

    clip_norm: float
    noise_multiplier: float

    def __post_init__(self) -> None:
        if not self.clip_norm > 0 or self.clip_norm != self.clip_norm or self.clip_norm == float("inf"):
            raise ConfigError(f"the DP clipping norm must be a positive finite number, got {self.clip_norm}")
        if not self.noise_multiplier >= 0 or self.noise_multiplier == float("inf"):
            raise ConfigError(f"the DP noise multiplier must be finite and >= 0, got {self.noise_multiplier}")

    @property
    def noise_std(self) -> float:
        return self.noise_multiplier * self.clip_norm


def clip_rows(hidden: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Scale each row (last dim) down to L2 norm <= clip_norm; rows within the bound are unchanged.

    hidden: [..., D] -> [..., D] (computed in float32, returned in hidden's dtype)
    """
    x = hidden.float()
    norms = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # [..., 1]
    scale = torch.clamp(clip_norm / torch.clamp(norms, min=1e-12), max=1.0)
    return (x * scale).to(hidden.dtype)


def gaussian_rows(
    hidden: torch.Tensor, mechanism: GaussianRows, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Clip each row, then add N(0, noise_std^2) to every value.

    hidden: [..., D] -> [..., D] in hidden's dtype (the noise is drawn in float32)
    """
    clipped = clip_rows(hidden, mechanism.clip_norm).float()
    if mechanism.noise_multiplier > 0:
        noise = torch.randn(clipped.shape, generator=generator, dtype=torch.float32) * mechanism.noise_std
        clipped = clipped + noise
    return clipped.to(hidden.dtype)
