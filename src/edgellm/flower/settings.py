"""What a Flower run adds to a fine-tuning run: the strategy, client sampling, and how rounds map to steps.

Pure: no Flower import, so the CLI validates its options before anything heavy loads.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from edgellm.errors import ConfigError

if TYPE_CHECKING:  # the CLI imports this module to build its parser: no torch here
    from edgellm.train.config import TrainConfig

STRATEGIES = {
    "fedavg": "FedAvg: the device-side adapters averaged, weighted by the samples each client trained on",
    "fedprox": "FedProx: FedAvg, with each device adding (mu/2)*||w - w_global||^2 to its loss (--proximal-mu)",
    "fedadam": "FedAdam: the average update applied by a server-side Adam step (--server-lr)",
}


@dataclass(frozen=True)
class FlowerSettings:
    """The Flower side of `edgellm finetune --engine flower`.

    Attributes:
        strategy: one of `STRATEGIES`; with the run's DP-FedAvg settings it becomes DP-FedAvg (equal weights,
            clipped updates, Gaussian noise on their mean: `edgellm.lora.fedavg.dp_fedavg`).
        fraction: the fraction of the devices sampled to train in each round (Flower's `fraction_train`).
        min_clients: at least this many devices train in a round (Flower's `min_train_nodes`).
        proximal_mu: FedProx's proximal weight.
        server_lr: FedAdam's server learning rate (Flower's `eta`).
        cpus_per_client: CPU cores the simulation engine reserves per virtual device (Ray's `num_cpus`): with
            C cores, C / cpus_per_client devices train at once.
    """

    strategy: str = "fedavg"
    fraction: float = 1.0
    min_clients: int = 1
    proximal_mu: float = 0.01
    server_lr: float = 1e-2
    cpus_per_client: float = 1.0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown Flower strategy {self.strategy!r}; choose from {sorted(STRATEGIES)}")
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"--fraction must lie in (0, 1], got {self.fraction}")
        if self.min_clients < 1:
            raise ConfigError(f"--min-clients must be >= 1, got {self.min_clients}")
        for name in ("proximal_mu", "server_lr", "cpus_per_client"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name.replace('_', ' ')} must be a finite number >= 0, got {value}")
        if not self.server_lr > 0 or not self.cpus_per_client > 0:
            raise ConfigError("--server-lr and --cpus-per-client must be > 0")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> FlowerSettings:
        try:
            data = json.loads(text)
            return cls(**data)
        except (TypeError, ValueError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"Flower settings: {exc}") from None


def check_flower_config(config: TrainConfig, settings: FlowerSettings) -> None:
    """Refuse a run the Flower engine does not run (each with what to do instead).

    Raises:
        ConfigError: one client, QAT, full fine-tuning, no adapters, or DP on the smashed data.
    """
    if config.clients < 2:
        raise ConfigError("--engine flower federates devices: pass --clients 2 or more")
    if settings.min_clients > config.clients:
        raise ConfigError(f"--min-clients {settings.min_clients} exceeds --clients {config.clients}")
    if config.qat is not None or config.train_layers is not None or not config.adapters:
        raise ConfigError("--engine flower trains LoRA adapters only: drop --qat/--train-layers/--no-lora")
    if config.dp is not None:
        raise ConfigError(
            "--engine flower does not yet add DP to the smashed data (--dp-clip/--dp-noise): use the default engine "
            "for that, or DP-FedAvg (--dp-fedavg-clip/--dp-fedavg-noise) here"
        )
    if config.dp_fedavg is not None and settings.strategy != "fedavg":
        raise ConfigError(
            f"DP-FedAvg replaces the {settings.strategy} strategy: drop --strategy or the DP-FedAvg options"
        )


@dataclass(frozen=True)
class Round:
    """Round `number` (1-based) trains steps `first`..`last - 1` (0-based) on each sampled device."""

    number: int
    first: int
    last: int

    @property
    def steps(self) -> int:
        return self.last - self.first


def rounds(config: TrainConfig) -> list[Round]:
    """The run's rounds: `aggregate_every` steps each, the last one shorter when it does not divide `steps`; the
    same steps and aggregation points as the default engine's FedAvg rounds."""
    every = config.aggregate_every
    count = math.ceil(config.steps / every)
    return [Round(r + 1, r * every, min((r + 1) * every, config.steps)) for r in range(count)]


def round_checkpointed(config: TrainConfig, rnd: Round) -> bool:
    """Whether the run checkpoints after `rnd` (the last round always)."""
    return config.checkpoints_after(rnd.last)
