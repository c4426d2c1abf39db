"""The device's side of split learning: its own stages with adapters, and the servers as autograd functions.

The device runs the embedding and its first layers, sends the hidden states ("smashed data") through the
server hops, runs the head on what comes back, and computes the loss against labels that never leave it.
`loss.backward()` then sends the gradient of the returned hidden states back through the same hops (in reverse
order), each server backpropagating through its own stage and stepping its own optimizer, and finishes on the
device's first stage. A server hop is a `torch.autograd.Function`, so the device code is an ordinary training
step.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from edgellm.errors import ConfigError, PeerError
from edgellm.lora.config import LoraSpec
from edgellm.lora.fedavg import clip_update
from edgellm.lora.inject import (
    adapter_grads,
    adapter_parameters,
    adapter_state,
    inject_lora,
    load_adapter_state,
    set_active,
    stage_keys,
    train_mode,
)
from edgellm.model.stage import Stage
from edgellm.net.messages import AdapterSync, ForwardReply, HopTrace, SyncReply, TrainBackward, TrainForward, TrainOpen
from edgellm.privacy.accountant import PrivacyLedger
from edgellm.privacy.config import TrainPrivacy
from edgellm.privacy.mods import RowGuard
from edgellm.split.pipeline import TrainHop
from edgellm.splitlearn.settings import seed_for
from edgellm.train.data import IGNORE, Batch, causal_lm_loss

DEVICE_ADAPTER = "device"


@dataclass
class StepTraffic:
    """What one training step sent over the network: bytes per link ("a->b"), both directions together."""

    bytes_by_link: dict[str, int] = field(default_factory=dict)
    compute_ms_by_node: dict[str, float] = field(default_factory=dict)

    def add(self, trace: Sequence[HopTrace]) -> None:
        for t in trace:
            self.bytes_by_link[t.link] = self.bytes_by_link.get(t.link, 0) + t.bytes_up + t.bytes_down
            self.compute_ms_by_node[t.node] = self.compute_ms_by_node.get(t.node, 0.0) + t.compute_ms


@dataclass
class _RemoteCall:
    """One hop's part of one step: what `_Remote` needs to send the forward and the backward."""

    hop: TrainHop
    session: str
    step: int
    positions: torch.Tensor
    token_mask: torch.Tensor | None
    traffic: StepTraffic
    wait_s: float  # another client may hold a shared adapter this long
    grad_guard: RowGuard | None = None  # DP on the gradient this hop's backward sends (the device's first one)


class _Remote(torch.autograd.Function):
    """Hidden states through a server hop; the gradient back through it."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, call: _RemoteCall) -> torch.Tensor:  # type: ignore[override]
        ctx.call = call
        message = TrainForward(call.session, call.step, h.detach(), call.positions, call.token_mask)
        reply = call.hop.train(message, call.wait_s)
        _expect_forward(reply, call.hop.name)
        call.traffic.add(reply.trace)
        return reply.output.to(h.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        call: _RemoteCall = ctx.call
        sent = grad if call.grad_guard is None else call.grad_guard.release(grad, call.token_mask)
        reply = call.hop.train(TrainBackward(call.session, call.step, sent.contiguous()))
        _expect_forward(reply, call.hop.name)
        call.traffic.add(reply.trace)
        return reply.output.to(grad.dtype), None


def _expect_forward(reply: Any, name: str) -> None:
    if not isinstance(reply, ForwardReply):
        raise PeerError(f"hop {name} answered a training step with a {type(reply).__name__}")


class SplitModel:
    """A model split between this device (`stages`) and servers (`hops`), with LoRA adapters on every side.

    Args:
        stages: the device's stages in execution order: the first holds the embedding (and its layers), the
            last the head; with no hops they may be one stage holding the whole model (centralized training).
        hops: the server hops, in the order the hidden states visit them (one hop in chain mode).
        layers_path: where the decoder layers sit in the full model ("model.layers"), for adapter names.
        lora: the adapters to add to the device's stages (the servers get theirs from `open`); None adds none
            (full fine-tuning of a layer range: the caller makes those weights trainable and optimizes them).
        session: this client's training session id on the servers.
        aggregator: where FedAvg rounds meet when it is not the first server (federated runs without a split).
        wait_s: how long a server may rightly hold a call (the run's round timeout): a FedAvg round filling up,
            or another client's turn on a shared adapter.
        privacy: differential privacy on what leaves the device (`edgellm.privacy`): the smashed data sent to
            the first server, optionally the gradients sent back, and DP-FedAvg's clipped updates; None: off.
    """

    def __init__(
        self,
        stages: Sequence[Stage],
        hops: Sequence[TrainHop],
        layers_path: str,
        lora: LoraSpec | None,
        session: str,
        aggregator: TrainHop | None = None,
        wait_s: float = 0.0,
        privacy: TrainPrivacy | None = None,
    ) -> None:
        if not stages or not stages[0].spec.embed:
            raise ConfigError("split learning needs the embedding on the device: token ids never leave it")
        if not stages[-1].spec.head:
            raise ConfigError('split learning needs the head on the device (head = "device"): labels never leave it')
        self.stages = list(stages)
        self.hops = list(hops)
        self.aggregator = aggregator if aggregator is not None else (self.hops[0] if self.hops else None)
        self.session = session
        self.lora = lora
        self.wait_s = wait_s
        for stage in self.stages:
            stage.requires_grad_(False)
            if len(stage.blocks) and lora is not None:
                inject_lora(stage, layers_path, lora, DEVICE_ADAPTER)
                set_active(stage, DEVICE_ADAPTER)
                train_mode(stage, DEVICE_ADAPTER)
        self.params = [p for s in self.stages if len(s.blocks) for p in adapter_parameters(s, DEVICE_ADAPTER)]
        for p in self.params:
            p.requires_grad_(True)
        if lora is not None and not self.params and not self.hops:
            raise ConfigError("no adapters to train: the device holds no decoder layers and there are no servers")
        self.privacy = privacy or TrainPrivacy()
        dp, fed = self.privacy.smashed, self.privacy.fedavg
        if dp is not None and not self.hops:
            raise ConfigError("differential privacy on smashed data needs a server: this run sends nothing")
        self.guard = None if dp is None else RowGuard.for_rows(dp)
        self.grad_guard = None if dp is None else RowGuard.for_gradients(dp)
        self.fedavg_ledger = None
        if fed is not None:
            self.fedavg_ledger = PrivacyLedger("dp_fedavg", fed.clip_norm, fed.noise_multiplier, fed.delta,
                                               fed.max_epsilon, unit="client update")  # fmt: skip
        self._round_start = self.device_state() if fed is not None else {}  # DP-FedAvg clips updates from here

    # -- the training step ---------------------------------------------------------------------------------
    def loss(self, batch: Batch, step: int, seed: int) -> tuple[torch.Tensor, StepTraffic]:
        """The loss of `batch` with a graph through every side of the split; `.backward()` trains the servers.

        batch.ids, labels: [B, S] int64, token_mask: [B, S] bool -> scalar loss
        """
        traffic = StepTraffic()
        positions = torch.arange(batch.ids.shape[1]).expand_as(batch.ids)
        mask = None if bool(batch.token_mask.all()) else batch.token_mask
        torch.manual_seed(seed_for(seed, step, 0))
        h = self.stages[0](batch.ids, positions, None, mask)
        if self.guard is not None:  # [B, S, D], clipped and noised; differentiable, so the first stage trains
            h = self.guard.release(h, mask)
        for i, hop in enumerate(self.hops):
            grad_guard = self.grad_guard if i == len(self.hops) - 1 else None  # the gradient the head sends
            call = _RemoteCall(hop, self.session, step, positions, mask, traffic, 2 * self.wait_s, grad_guard)
            h = _Remote.apply(h, call)
        head = self.stages[-1]
        if len(self.stages) > 1 and not len(head.blocks):
            # A head-only stage sees each position alone: score only the positions that predict a label (the
            # response, for instructions), which skips most of the vocabulary-sized matmul and softmax.
            for stage in self.stages[1:-1]:
                h = stage(h, positions, None, mask)
            targets = batch.labels[:, 1:] != IGNORE  # [B, S-1]
            picked = h[:, :-1][targets].unsqueeze(0)  # [1, N, D]
            logits = head(picked, torch.zeros(picked.shape[:2], dtype=torch.int64))  # [1, N, V]
            return F.cross_entropy(logits[0], batch.labels[:, 1:][targets]), traffic
        for stage in self.stages[1:]:
            h = stage(h, positions, None, mask)
        return causal_lm_loss(h, batch.labels), traffic

    @torch.no_grad()
    def logits(self, batch: Batch) -> torch.Tensor:
        """Evaluate the split model with its adapters (dropout off, nothing kept for a backward pass).

        batch.ids: [B, S] int64, token_mask: [B, S] bool -> [B, S, V] float32 logits
        """
        positions = torch.arange(batch.ids.shape[1]).expand_as(batch.ids)
        mask = None if bool(batch.token_mask.all()) else batch.token_mask
        for stage in self.stages:
            if len(stage.blocks):
                train_mode(stage, DEVICE_ADAPTER, False)
        try:
            h = self.stages[0](batch.ids, positions, None, mask)
            if self.guard is not None and self.hops:
                h = self.guard.release(h, mask)
            for hop in self.hops:
                reply = hop.train(TrainForward(self.session, 0, h, positions, mask, eval=True))
                _expect_forward(reply, hop.name)
                h = reply.output.to(h.dtype)
            for stage in self.stages[1:]:
                h = stage(h, positions, None, mask)
        finally:
            for stage in self.stages:
                if len(stage.blocks):
                    train_mode(stage, DEVICE_ADAPTER, True)
        return h

    # -- sessions and adapters on the servers --------------------------------------------------------------
    def open(self, open_message: TrainOpen) -> list[dict[str, Any]]:
        """Open this client's session on every server; returns each server's detail (adapter, parameters)."""
        details: list[dict[str, Any]] = []
        targets = list(self.hops)
        if self.aggregator is not None and self.aggregator not in targets:
            targets.append(self.aggregator)
        for hop in targets:
            reply = hop.train(open_message)
            details += json.loads(_sync(reply, hop.name).detail)
        return details

    def sync(self, op: str, step: int = 0, grads: bool = False) -> tuple[dict[str, torch.Tensor], list[Any]]:
        """`get` or `checkpoint` on every server (merged), e.g. to export or to compare gradients."""
        tensors: dict[str, torch.Tensor] = {}
        details: list[Any] = []
        for hop in self.hops:
            reply = _sync(hop.train(AdapterSync(self.session, op, step, grads=grads)), hop.name)
            tensors.update(dict(reply.tensors))
            details += json.loads(reply.detail)
        return tensors, details

    def put_server_adapters(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load the server-side part of an adapter into the servers (each takes its own layers' weights)."""
        mine = self.device_keys()
        items = tuple((k, v) for k, v in tensors.items() if k not in mine)
        for hop in self.hops:
            _sync(hop.train(AdapterSync(self.session, "put", tensors=items)), hop.name)

    def aggregate(self, step: int, weight: float) -> list[int]:
        """FedAvg of the device-side adapters with the other clients' (at the aggregator, by default the first
        server); loads the average. Returns the clients the average came from.
        """
        if self.aggregator is None:
            raise ConfigError("federated averaging needs a server or an aggregator to meet at; this run has none")
        state = self.device_state()
        fed = self.privacy.fedavg
        if fed is not None and self.fedavg_ledger is not None:  # clip, and charge the round before sending
            state = clip_update(state, self._round_start, fed.clip_norm)
            self.fedavg_ledger.charge(1, sample_rate=1.0)  # every client joins every round: q = clients / clients
            weight = 1.0  # DP-FedAvg weighs clients equally (the noise is calibrated to one client's share)
        message = AdapterSync(self.session, "aggregate", step, weight, tuple(state.items()))
        reply = _sync(self.aggregator.train(message, self.wait_s), self.aggregator.name)
        self.load_device_state(dict(reply.tensors))
        return list(json.loads(reply.detail)[0]["clients"])

    # -- the device's own adapters -------------------------------------------------------------------------
    def device_keys(self) -> set[str]:
        return set().union(*(stage_keys(s, DEVICE_ADAPTER) for s in self.stages))

    def device_state(self) -> dict[str, torch.Tensor]:
        return {k: v for s in self.stages for k, v in adapter_state(s, DEVICE_ADAPTER).items()}

    def device_grads(self) -> dict[str, torch.Tensor]:
        return {k: v for s in self.stages for k, v in adapter_grads(s, DEVICE_ADAPTER).items()}

    def load_device_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load the device's adapter weights out of `tensors` (which may also hold the servers')."""
        for stage in self.stages:
            load_adapter_state(stage, DEVICE_ADAPTER, tensors, strict=False)
        if self.privacy.fedavg is not None:  # a loaded state (an average, a checkpoint) starts a round
            self._round_start = self.device_state()

    def privacy_report(self) -> dict[str, Any] | None:
        """Each defence's ledger (`smashed_data`, `gradients`, `dp_fedavg`), or None with every defence off."""
        guards = [self.guard, self.grad_guard]
        ledgers = [g.ledger for g in guards if g is not None] + [x for x in [self.fedavg_ledger] if x is not None]
        return {ledger.mechanism: ledger.to_json() for ledger in ledgers} or None


def _sync(reply: Any, name: str) -> SyncReply:
    if not isinstance(reply, SyncReply):
        raise PeerError(f"hop {name} answered an adapter message with a {type(reply).__name__}")
    return reply
