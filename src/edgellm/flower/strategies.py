"""The ServerApp's strategies: Flower's FedAvg, FedProx and FedAdam over the device-side adapters, and the
project's DP-FedAvg as a Flower strategy; their state for checkpoints."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from edgellm.lora.fedavg import dp_fedavg
from edgellm.privacy.config import DPConfig

from .settings import FlowerSettings

WEIGHT_KEY = "num-examples"  # the samples a device trained on in the round: FedAvg's weight


class DPFedAvg(FedAvg):
    """DP-FedAvg (McMahan et al. 2018) with the project's mechanism (`edgellm.lora.fedavg.dp_fedavg`): the devices
    clip their updates before sending (`edgellm.flower.device`), this strategy averages them with equal weights
    and adds Gaussian noise of std `noise_multiplier * clip_norm / n` to the mean, seeded per round from `dp`."""

    def __init__(self, dp: DPConfig, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dp = dp
        self.salt = 0  # the round's last step: the noise the default engine draws for the same round

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(list(replies), is_train=True)
        if not valid:
            return None, None
        states = [next(iter(m.content.array_records.values())).to_torch_state_dict() for m in valid]
        dp = self.dp
        mean = dp_fedavg(states, dp.clip_norm, dp.noise_multiplier, dp.generator(salt=self.salt))
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        return ArrayRecord(torch_state_dict=mean), metrics


def build_strategy(settings: FlowerSettings, clients: int, dp: DPConfig | None) -> FedAvg:
    """The strategy `settings` names (DP-FedAvg when `dp` is set), sampling `settings.fraction` of `clients`
    devices per round, at least `settings.min_clients`, once all `clients` have connected."""
    common: dict[str, Any] = {
        "fraction_train": settings.fraction, "fraction_evaluate": 0.0, "min_train_nodes": settings.min_clients,
        "min_available_nodes": clients, "weighted_by_key": WEIGHT_KEY,
    }  # fmt: skip
    if dp is not None:
        return DPFedAvg(dp, **common)
    if settings.strategy == "fedprox":
        return FedProx(proximal_mu=settings.proximal_mu, **common)
    if settings.strategy == "fedadam":
        return FedAdam(eta=settings.server_lr, eta_l=settings.server_lr, **common)
    return FedAvg(**common)


_STATE = ("m_t", "v_t", "current_arrays")  # FedOpt's moments and its current model


def strategy_state(strategy: FedAvg) -> dict[str, dict[str, torch.Tensor]]:
    """What a strategy carries from round to round (FedAdam's moments), as tensors for a checkpoint."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name in _STATE:
        value = getattr(strategy, name, None)
        if isinstance(value, dict) and value:
            out[name] = {k: torch.from_numpy(np.array(v)) for k, v in value.items()}
    return out


def load_strategy_state(strategy: FedAvg, state: dict[str, dict[str, torch.Tensor]]) -> None:
    """Restore `strategy_state`'s output into a fresh strategy of the same kind."""
    for name, tensors in state.items():
        if name in _STATE and hasattr(strategy, name):
            setattr(strategy, name, {k: v.numpy() for k, v in tensors.items()})


def to_record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: Array(v.detach().cpu().contiguous().numpy()) for k, v in tensors.items()})


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v.numpy())) for k, v in record.items()}
