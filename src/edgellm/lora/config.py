"""`LoraSpec`: the hyper-parameters of one LoRA adapter, with the meanings of peft's `LoraConfig`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from edgellm.errors import ConfigError

ALL_LINEAR = "all-linear"  # as the only target: every linear-like module inside the decoder blocks
# every projection of a block: the Llama family's names, and Phi-3's fused qkv_proj and gate_up_proj
DEFAULT_TARGETS = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj"
)  # fmt: skip


@dataclass(frozen=True)
class LoraSpec:
    """LoRA hyper-parameters, with peft LoraConfig meanings.

    Attributes:
        r: the rank of the update `B @ A`.
        alpha: the update is scaled by `alpha / r` (peft's `lora_alpha`; no rsLoRA).
        dropout: dropout on the adapter's input, in training mode only (peft's `lora_dropout`).
        target_modules: module names matched as dotted suffixes of the full module name, as peft does
            ("q_proj" matches "model.layers.3.self_attn.q_proj"); `("all-linear",)` wraps every linear-like
            module inside the decoder blocks.
        init_seed: seeds each module's initial `A` (with the module's full name), so the same module starts the
            same whichever process or stage holds it.

    Raises:
        ConfigError: r < 1, alpha <= 0, dropout outside [0, 1), or empty / malformed targets.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    init_seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"LoRA rank r must be an integer >= 1, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ConfigError(f"LoRA alpha must be a number > 0, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ConfigError(f"LoRA dropout must lie in [0, 1), got {self.dropout!r}")
        if isinstance(self.init_seed, bool) or not isinstance(self.init_seed, int):
            raise ConfigError(f"LoRA init_seed must be an integer, got {self.init_seed!r}")
        targets = self.target_modules
        if isinstance(targets, str) or not isinstance(targets, (tuple, list)):
            raise ConfigError(f"LoRA target_modules must be a tuple of module names, got {targets!r}")
        if not targets or not all(isinstance(t, str) and t and not t.startswith(".") for t in targets):
            raise ConfigError(f"LoRA target_modules must be non-empty module names, got {targets!r}")
        if ALL_LINEAR in targets and len(targets) > 1:
            raise ConfigError(f"{ALL_LINEAR!r} must be the only LoRA target, got {list(targets)}")
        # Normalise what the checks above accepted, so equal specs compare and hash equal.
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))
        object.__setattr__(self, "target_modules", tuple(targets))

    @property
    def scaling(self) -> float:
        """The factor on `B @ A x`: alpha / r."""
        return self.alpha / self.r

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict that `from_dict` reads back."""
        return {
            "r": self.r,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "target_modules": list(self.target_modules),
            "init_seed": self.init_seed,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LoraSpec:
        """The spec `to_dict` wrote; missing keys take their defaults.

        Raises:
            ConfigError: unknown keys (named, with the valid ones), or invalid values.
        """
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - valid)
        if unknown:
            raise ConfigError(f"unknown LoRA spec keys {unknown}; valid keys: {sorted(valid)}")
        values = dict(d)
        if isinstance(values.get("target_modules"), list):
            values["target_modules"] = tuple(values["target_modules"])
        return cls(**values)
