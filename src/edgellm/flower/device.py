"""A device's part of a Flower round: its split training steps, checkpoints and export, without Flower itself.

The ClientApp (`edgellm.flower.client_app`) hands this module the round's global device-side adapter and the
device's state from the previous rounds (`DeviceState`: its session on the servers and its optimizer), and gets
back the trained adapter, the round's step events and the new state. The frozen model a device trains through is
loaded once per process and shared by every virtual device that process runs (the simulation engine runs many
devices in few processes); everything that differs between devices is in `DeviceState` or on the servers.
"""

from __future__ import annotations

import io
import json
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from edgellm.errors import ConfigError
from edgellm.lora.fedavg import clip_update
from edgellm.lora.peft_io import load_peft_adapter
from edgellm.net.messages import CloseSession, TrainOpen
from edgellm.privacy.accountant import PrivacyLedger
from edgellm.splitlearn.device_model import SplitModel
from edgellm.train.client import (
    ClientPlan,
    DeviceSide,
    checkpoint_name,
    checkpoint_steps,
    export_adapter,
    load_side,
    save_checkpoint,
    start_from,
    train_step,
)
from edgellm.train.coordinator import plan_to_dict

log = logging.getLogger(__name__)

Tensors = dict[str, torch.Tensor]


@dataclass
class DeviceState:
    """What one device keeps between the rounds it trains in (Flower keeps it in the node's context).

    Attributes:
        session: its training session on the servers ("" before its first round, and after the export).
        optimizer: its AdamW state (`torch.save` bytes), so a round continues the optimizer of the previous one.
        dp_rates: DP-FedAvg: the sampling rate of each round the device sent a clipped update in.
    """

    session: str = ""
    optimizer: bytes = b""
    dp_rates: list[float] = field(default_factory=list)

    def to_record(self) -> dict[str, Any]:
        return {"session": self.session, "optimizer": self.optimizer, "dp-rates": json.dumps(self.dp_rates)}

    @classmethod
    def from_record(cls, record: Any) -> DeviceState:
        if record is None:
            return cls()
        return cls(str(record["session"]), bytes(record["optimizer"]), list(json.loads(str(record["dp-rates"]))))


@dataclass(frozen=True)
class RoundOrder:
    """What the ServerApp asks of a device in one round.

    Attributes:
        first, last: the steps (0-based, `last` excluded) to train.
        checkpoint: checkpoint after the last step (servers, then the device).
        proximal_mu: FedProx's proximal weight; 0: plain local training.
        sample_rate: the fraction of the devices sampled this round (DP-FedAvg's accounting).
    """

    first: int
    last: int
    checkpoint: bool = False
    proximal_mu: float = 0.0
    sample_rate: float = 1.0


@dataclass
class _Loaded:
    side: DeviceSide
    model: SplitModel
    initial: Tensors  # the device-side adapter every device starts from


_LOADED: dict[str, _Loaded] = {}


def _loaded(plan: ClientPlan) -> _Loaded:
    """The device's frozen model and hops for `plan`, loaded once per process (whichever device asks first)."""
    key = json.dumps(plan_to_dict(replace(plan, client=0)), sort_keys=True)
    found = _LOADED.get(key)
    if found is None:
        _LOADED.clear()  # one run per process at a time
        side = load_side(replace(plan, client=0))
        model = SplitModel(side.stages, side.hops, side.layers_path, plan.config.lora, "", None,
                           plan.config.round_timeout_s)  # fmt: skip
        initial = model.device_state()
        if plan.init_adapter is not None:
            _, tensors = load_peft_adapter(plan.init_adapter)
            initial.update({k: v for k, v in tensors.items() if k in initial})
        found = _LOADED[key] = _Loaded(side, model, initial)
    return found


def initial_adapter(plan: ClientPlan) -> Tensors:
    """The device-side adapter every device starts from: LoRA's seeded init, or `--init-adapter`'s device part."""
    return {k: v.clone() for k, v in _loaded(plan).initial.items()}


def train_round(
    plan: ClientPlan, state: DeviceState, adapter: Tensors, order: RoundOrder
) -> tuple[Tensors, float, list[dict[str, Any]], DeviceState, dict[str, Any] | None]:
    """Train device `plan.client` for one round from the global device-side `adapter`.

    Returns:
        the adapter to aggregate (with DP-FedAvg: its update from `adapter` clipped), its FedAvg weight (the
        samples trained on; 1 with DP-FedAvg), the round's step events, the device's new state, and its
        DP-FedAvg ledger (None without).

    Raises:
        ConfigError: bad settings, or a resumed run whose checkpoint is missing.
        PeerError, SessionError, ...: a server failed; Flower counts the device out of this round.
    """
    cfg = plan.config
    loaded = _loaded(plan)
    model, side = loaded.model, loaded.side
    (plan.output / f"client-{plan.client}").mkdir(parents=True, exist_ok=True)
    optimizer = torch.optim.AdamW(model.params, **cfg.optim.adamw_kwargs())
    events: list[dict[str, Any]] = []  # the default engine's: "open" on a device's first round, then "step"s
    if state.session:
        model.session = state.session
        optimizer.load_state_dict(torch.load(io.BytesIO(state.optimizer), weights_only=True))
    else:
        session, opened = _open(plan, model, optimizer, order.first)
        state = replace(state, session=session)
        events.append({**opened, "device_trainable": sum(p.numel() for p in model.params),
                       "examples": len(side.dataset)})  # fmt: skip
    model.load_device_state(adapter)
    regularizer = _proximal(model, order.proximal_mu)
    events += [train_step(model, optimizer, side, plan, step, regularizer) for step in range(order.first, order.last)]
    if order.checkpoint:
        save_checkpoint(model, optimizer, plan.output / f"client-{plan.client}", order.last, {})
    trained = model.device_state()
    weight = float(cfg.batch_size * (order.last - order.first))
    ledger = None
    fed = cfg.dp_fedavg
    if fed is not None:  # clip the update before it leaves the device, and charge the release
        trained = clip_update(trained, adapter, fed.clip_norm)
        weight = 1.0
        rates = [*state.dp_rates, order.sample_rate]
        ledger = _ledger(plan, rates)
        state = replace(state, dp_rates=rates)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    return trained, weight, events, replace(state, optimizer=buffer.getvalue()), ledger


def export(plan: ClientPlan, state: DeviceState, adapter: Tensors) -> str | None:
    """Write the device's final adapter (the global device side and its servers' side, one peft adapter) to
    `client-K/adapter` and close its session; None for a device that never trained (it has no session)."""
    if not state.session:
        return None
    loaded = _loaded(plan)
    loaded.model.session = state.session
    loaded.model.load_device_state(adapter)
    try:
        return str(export_adapter(loaded.model, plan, loaded.side))
    finally:
        close(plan, state)


def close(plan: ClientPlan, state: DeviceState) -> None:
    """Close the device's session on every server (a server that is gone has nothing to free)."""
    if not state.session:
        return
    for hop in _loaded(plan).side.hops:
        try:
            hop.close(CloseSession(state.session))
        except Exception as exc:  # noqa: BLE001
            log.info("closing session on %s: %s", hop.name, exc)


def _open(
    plan: ClientPlan, model: SplitModel, optimizer: torch.optim.Optimizer, first: int
) -> tuple[str, dict[str, Any]]:
    """Open the device's session on every server: fresh, or (`plan.resume`) from its newest checkpoint at or
    before step `first`, which the servers load too. Returns the session and its "open" event."""
    cfg = plan.config
    folder = plan.output / f"client-{plan.client}"
    resume_step = max((s for s in checkpoint_steps(folder) if s <= first), default=0) if plan.resume else 0
    session = f"{plan.run}-c{plan.client}-{secrets.token_hex(4)}"
    model.session = session
    message = TrainOpen(session, plan.run, plan.attempt, plan.client, cfg.clients, cfg.server_config().to_json(),
                        resume_step)  # fmt: skip
    servers = model.open(message)
    if resume_step:
        saved = torch.load(folder / checkpoint_name(resume_step), weights_only=True)
        optimizer.load_state_dict(saved["optimizer"])
    elif plan.init_adapter is not None and not plan.resume:
        start_from(model, plan.init_adapter, cfg)  # the servers' part; the device's comes with the round
    return session, {"event": "open", "client": plan.client, "start_step": resume_step, "servers": servers}


def _proximal(model: SplitModel, mu: float) -> Callable[[], torch.Tensor] | None:
    """FedProx's `(mu/2) * ||w - w_global||^2` over the device-side adapter, from the weights just loaded."""
    if mu <= 0:
        return None
    anchor = [p.detach().clone() for p in model.params]

    def term() -> torch.Tensor:
        return 0.5 * mu * sum((((p - a) ** 2).sum() for p, a in zip(model.params, anchor, strict=True)),
                              torch.zeros(()))  # fmt: skip

    return term


def _ledger(plan: ClientPlan, rates: list[float]) -> dict[str, Any]:
    """The device's DP-FedAvg ledger after the releases at `rates` (refused past its budget, before sending)."""
    fed = plan.config.dp_fedavg
    if fed is None:
        raise ConfigError("no DP-FedAvg settings")
    ledger = PrivacyLedger("dp_fedavg", fed.clip_norm, fed.noise_multiplier, fed.delta, fed.max_epsilon,
                           unit="client update")  # fmt: skip
    for rate in rates:
        ledger.charge(1, sample_rate=rate)
    return ledger.to_json()
