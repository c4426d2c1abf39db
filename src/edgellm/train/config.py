"""What a fine-tuning run is: data, steps, adapters, optimizer, clients and their aggregation, checkpoints."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgellm.errors import ConfigError
from edgellm.lora.config import LoraSpec
from edgellm.privacy.config import DPConfig, TrainPrivacy
from edgellm.qat.walker import check_qat_config
from edgellm.quant.scheme import parse_quant
from edgellm.splitlearn.settings import SHARE_MODES, OptimSpec, ServerTrainConfig


@dataclass(frozen=True)
class DataSpec:
    """Training data: a text or JSONL file, or a built-in task (`edgellm.train.tasks.TASKS`).

    Attributes:
        path: a UTF-8 text file (every token trained on) or a JSONL file of {"prompt", "response"} objects
            (loss on the response only).
        task: a built-in task name; `task_examples` examples of its train split are generated from `seed`.
    """

    path: Path | None = None
    task: str | None = None
    task_examples: int = 2000

    def __post_init__(self) -> None:
        if (self.path is None) == (self.task is None):
            raise ConfigError("give exactly one of --data FILE and --task NAME")
        if self.task_examples < 1:
            raise ConfigError(f"task examples must be >= 1, got {self.task_examples}")

    @property
    def label(self) -> str:
        return f"task:{self.task}" if self.task is not None else str(self.path)


@dataclass(frozen=True)
class TrainConfig:
    """One client's training settings (every client of a run uses the same).

    Attributes:
        steps: optimizer steps per client.
        batch_size, seq_len: rows per step and the longest row (longer examples are cut).
        lora, optim: adapters and AdamW, the same on the device and the servers.
        seed: data order, adapter init, dropout.
        share: server-side adapters shared by all clients or one per client (`SHARE_MODES`).
        clients: devices training together; their device-side adapters are averaged (FedAvg).
        aggregate_every: steps between FedAvg rounds (and after the last step); ignored with one client.
        checkpoint_every: steps between checkpoints (also after the last step); 0: only after the last step.
        round_timeout_s: a FedAvg round closes this long after its first client, without the missing ones.
        dp: differential privacy on the smashed data each device sends (and optionally the gradients it sends
            back); None: off. dp_fedavg: DP-FedAvg of the device-side adapters; None: plain FedAvg.
        qat: quantization-aware training with this scheme (`--quant`'s syntax, e.g. "int4-g64,head=int8"): every
            side computes with its trainable weights fake-quantized (`edgellm.qat`) and the run exports the
            quantized model; None: off.
        train_layers: decoder layers [start, end) whose weights train in full (full fine-tuning), on the device.
        adapters: train LoRA adapters (False: only `train_layers` trains).
    """

    steps: int
    data: DataSpec
    batch_size: int = 8
    seq_len: int = 128
    lora: LoraSpec = field(default_factory=LoraSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    seed: int = 0
    share: str = "shared"
    clients: int = 1
    aggregate_every: int = 10
    checkpoint_every: int = 0
    round_timeout_s: float = 120.0
    dp: DPConfig | None = None
    dp_fedavg: DPConfig | None = None
    qat: str | None = None
    train_layers: tuple[int, int] | None = None
    adapters: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "clients", "aggregate_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', ' ')} must be >= 1, got {getattr(self, name)}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint every must be >= 0, got {self.checkpoint_every}")
        if self.share not in SHARE_MODES:
            raise ConfigError(f"unknown adapter sharing {self.share!r}; choose from {sorted(SHARE_MODES)}")
        if self.clients > 1 and self.checkpoint_every and self.checkpoint_every % self.aggregate_every:
            raise ConfigError(
                f"with several clients, checkpoints come at aggregation rounds: --checkpoint-every "
                f"{self.checkpoint_every} must be a multiple of --aggregate-every {self.aggregate_every}"
            )

        if self.dp_fedavg is not None and self.clients < 2:
            raise ConfigError("DP-FedAvg (--dp-fedavg-clip/--dp-fedavg-noise) needs --clients 2 or more to average")
        TrainPrivacy(self.dp, self.dp_fedavg)  # validates the pair
        self._check_qat()

    def _check_qat(self) -> None:
        if self.qat is not None:
            quant = parse_quant(self.qat)
            if quant is None:
                raise ConfigError(f"--qat needs a quantization scheme, got {self.qat!r}")
            check_qat_config(quant)
        if self.train_layers is not None:
            start, end = self.train_layers
            if not 0 <= start < end:
                raise ConfigError(f"--train-layers A:B needs 0 <= A < B, got {start}:{end}")
            if self.clients > 1:
                raise ConfigError("--train-layers trains full weights, which FedAvg does not average: use one client")
        if not self.adapters and self.train_layers is None:
            raise ConfigError("--no-lora leaves nothing to train: add --train-layers A:B")
        if self.qat is not None and self.adapters and self.lora.dropout > 0:
            raise ConfigError(
                "--qat merges LoRA into the weights it quantizes, which dropout cannot be: drop --lora-dropout"
            )

    @property
    def privacy(self) -> TrainPrivacy:
        return TrainPrivacy(self.dp, self.dp_fedavg)

    def server_config(self) -> ServerTrainConfig:
        return ServerTrainConfig(
            self.lora, self.optim, self.share, self.seed, self.round_timeout_s, self.dp_fedavg, self.qat
        )

    def aggregates_after(self, step: int) -> bool:
        """Whether a FedAvg round follows step `step` (1-based count of steps done)."""
        return self.clients > 1 and (step % self.aggregate_every == 0 or step == self.steps)

    def checkpoints_after(self, step: int) -> bool:
        """Whether a checkpoint follows step `step` (1-based count of steps done)."""
        return step == self.steps or (self.checkpoint_every > 0 and step % self.checkpoint_every == 0)


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """A JSON-able form of `config` (for worker processes and the run record)."""
    out = asdict(config)
    out["lora"] = config.lora.to_dict()
    out["train_layers"] = None if config.train_layers is None else list(config.train_layers)  # as JSON has it
    out["data"] = {"path": str(config.data.path) if config.data.path else None, "task": config.data.task,
                   "task_examples": config.data.task_examples}  # fmt: skip
    return out


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """The inverse of `config_to_dict`."""
    fields = dict(data)
    raw = fields.pop("data")
    fields["data"] = DataSpec(Path(raw["path"]) if raw["path"] else None, raw["task"], raw["task_examples"])
    fields["lora"] = LoraSpec.from_dict(fields["lora"])
    fields["optim"] = OptimSpec(**fields["optim"])
    for key in ("dp", "dp_fedavg"):  # asdict's form: the full field names
        fields[key] = None if fields.get(key) is None else DPConfig(**fields[key])
    if fields.get("train_layers") is not None:  # JSON has no tuples
        fields["train_layers"] = tuple(fields["train_layers"])
    return TrainConfig(**fields)
