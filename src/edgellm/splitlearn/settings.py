"""Settings a device sends to the servers of a split-learning session (as JSON in `TrainOpen.config`)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from edgellm.errors import ConfigError
from edgellm.lora.config import LoraSpec
from edgellm.privacy.config import DPConfig
from edgellm.qat.walker import check_qat_config
from edgellm.quant.scheme import parse_quant

MAX_RANK = 1024

SHARE_MODES = {
    "shared": "one server-side adapter per run, updated by every client in turn (SplitLoRA)",
    "per-client": "each client has its own server-side adapter; only the client-side adapters are averaged",
}


@dataclass(frozen=True)
class OptimSpec:
    """AdamW settings, the same on every side of the split."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        # A peer sends these: refuse anything that is not a finite number before AdamW sees it.
        for name in ("lr", "weight_decay", "beta1", "beta2", "eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ConfigError(f"optimizer {name} must be a finite number, got {value!r}")
        if not self.lr > 0:
            raise ConfigError(f"learning rate must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight decay must be >= 0, got {self.weight_decay}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"AdamW betas must lie in [0, 1), got {self.beta1}, {self.beta2}")
        if not self.eps > 0:
            raise ConfigError(f"AdamW eps must be > 0, got {self.eps}")

    def adamw_kwargs(self) -> dict[str, Any]:
        return {"lr": self.lr, "weight_decay": self.weight_decay, "betas": (self.beta1, self.beta2), "eps": self.eps}


@dataclass(frozen=True)
class ServerTrainConfig:
    """What each server of a training session needs: its adapters, optimizer, sharing mode and seed.

    Attributes:
        lora: adapter hyper-parameters (the same on every node, so the exported adapter is one peft adapter).
        optim: the optimizer of the server-side adapters.
        share: one of `SHARE_MODES`.
        seed: seeds dropout per (seed, step), so a resumed run draws the same masks.
        round_timeout_s: an aggregation round closes this long after its first client arrived, with whoever came;
            and a client that holds a shared adapter's turn this long without its backward pass loses it.
        dp_fedavg: DP-FedAvg: the clients send updates clipped to `dp_fedavg.clip_norm` and the aggregator adds
            Gaussian noise to their mean (`edgellm.lora.fedavg.dp_fedavg`); None: plain FedAvg.
        qat: quantization-aware training: the scheme (`--quant`'s syntax) the server's adapters train through,
            fake-quantizing each merged weight (`edgellm.qat`); None: off.
    """

    lora: LoraSpec = field(default_factory=LoraSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    share: str = "shared"
    seed: int = 0
    round_timeout_s: float = 120.0
    dp_fedavg: DPConfig | None = None
    qat: str | None = None

    def __post_init__(self) -> None:
        if self.qat is not None:
            quant = parse_quant(self.qat) if isinstance(self.qat, str) else None
            if quant is None:
                raise ConfigError(f"training config: qat must name a quantization scheme, got {self.qat!r}")
            check_qat_config(quant)
        if self.share not in SHARE_MODES:
            raise ConfigError(f"unknown adapter sharing {self.share!r}; choose from {sorted(SHARE_MODES)}")
        if not self.round_timeout_s > 0:
            raise ConfigError(f"round timeout must be > 0 s, got {self.round_timeout_s}")
        if self.lora.r > MAX_RANK:  # a peer's settings: an absurd rank would only exhaust the server's memory
            raise ConfigError(f"LoRA rank {self.lora.r} exceeds this server's limit of {MAX_RANK}")

    def to_json(self) -> str:
        dp = None if self.dp_fedavg is None else self.dp_fedavg.to_json()
        data = {**asdict(self), "lora": self.lora.to_dict(), "dp_fedavg": dp}
        if self.qat is None:  # what a server without QAT reads
            del data["qat"]
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> ServerTrainConfig:
        """Parse `to_json`'s output. Raises ConfigError on bad JSON or unknown fields."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"training config is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError("training config must be a JSON object")
        _known(data, {"lora", "optim", "share", "seed", "round_timeout_s", "dp_fedavg", "qat"}, "training config")
        dp = data.get("dp_fedavg")
        optim = data.get("optim", {})
        if not isinstance(optim, dict):
            raise ConfigError("training config: optim must be an object")
        _known(optim, {"lr", "weight_decay", "beta1", "beta2", "eps"}, "training config optim")
        try:
            return cls(
                lora=LoraSpec.from_dict(data.get("lora", {})),
                optim=OptimSpec(**optim),
                share=str(data.get("share", "shared")),
                seed=_seed(data.get("seed", 0)),
                round_timeout_s=float(data.get("round_timeout_s", 120.0)),
                dp_fedavg=None if dp is None else DPConfig.from_json(dp, "training config dp_fedavg"),
                qat=data.get("qat"),
            )
        except (TypeError, ValueError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"training config: {exc}") from None


def _seed(value: Any) -> int:
    """A peer's seed: an integer in torch's seed range."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise ConfigError(f"training config: seed must be an integer in [0, 2**63), got {value!r}")
    return value


def _known(data: Mapping[str, Any], keys: set[str], what: str) -> None:
    unknown = set(data) - keys
    if unknown:
        raise ConfigError(f"{what}: unknown field(s) {sorted(unknown)}; expected {sorted(keys)}")


def seed_for(seed: int, step: int, salt: int = 0) -> int:
    """The RNG seed of one training step on one side: the same on every run with the same seed."""
    return (seed * 1_000_003 + step * 7_919 + salt) % (2**63 - 1)
