"""Split learning on a server: one stage, its LoRA adapters and optimizers, and the clients training through it.

Per client session the server keeps the activations of the last `TrainForward` until the matching
`TrainBackward` arrives, backpropagates the gradient it is given, steps the adapter's optimizer and returns the
gradient with respect to its input. Adapters live in the stage's `LoRALinear` wrappers under a name per run
(`shared`) or per run and client (`per-client`), so inference sessions on the same stage (adapter inactive) and
training sessions share one copy of the base weights.

A shared adapter is used by one client at a time, from its forward to its backward (`turns.Turns`); adapters
and their optimizers are `adapter_slot.AdapterSlot`s; checkpoints are `checkpoints.CheckpointStore`'s.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgellm.errors import BusyError, ConfigError, SessionError
from edgellm.lora.inject import adapter_grads, adapter_state, load_adapter_state, stage_keys, train_mode, use_adapter
from edgellm.net.messages import AdapterSync, ForwardReply, TrainBackward, TrainForward, TrainOpen
from edgellm.qat.walker import fake_quant_scope
from edgellm.quant.scheme import parse_quant
from edgellm.split.host import StageHost
from edgellm.splitlearn.adapter_slot import AdapterSlot, drop_slot, new_slot
from edgellm.splitlearn.checkpoints import CheckpointStore, safe_name
from edgellm.splitlearn.rounds import Aggregator
from edgellm.splitlearn.settings import ServerTrainConfig, seed_for
from edgellm.splitlearn.turns import Turns

log = logging.getLogger(__name__)


@dataclass
class _Session:
    slot: AdapterSlot
    run: str
    attempt: str
    client: int
    clients: int
    last_used: float
    pending: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (step, input, output)


class TrainHost:
    """Trains LoRA adapters of one stage for split-learning clients.

    Args:
        host: the stage host; its lock serializes training and inference on the stage.
        layers_path: where the decoder layers sit in the full model ("model.layers"), for adapter names.
        node: this node's name (details, errors).
        checkpoint_root: where checkpoints go (`<root>/<run>/<stage node>/<adapter>/step-N.pt`); None disables them.
        checkpoint_node: the folder name of this stage's checkpoints (default `node`): a replica keeps and resumes
            its primary's, so a run that fails over to it continues from the last checkpoint (`edgellm.failover`).
        clock: for session expiry and the turn timeout.
    """

    def __init__(
        self,
        host: StageHost,
        layers_path: str,
        node: str,
        checkpoint_root: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
        checkpoint_node: str | None = None,
    ) -> None:
        self.host = host
        self.stage = host.stage
        self.layers_path = layers_path
        self.node = node
        self.checkpoint_root = checkpoint_root
        self._clock = clock
        self._slots: dict[str, AdapterSlot] = {}
        self._names = itertools.count()
        self._sessions: dict[str, _Session] = {}
        self._turns = Turns(host.lock, clock, node)
        self.checkpoints = CheckpointStore(checkpoint_root, checkpoint_node or node)
        self.aggregator = Aggregator()

    # -- sessions --------------------------------------------------------------------------------------------
    def open(self, msg: TrainOpen) -> dict[str, Any]:
        """Start a client's session; create, reset or reload its adapter as `msg.attempt`/`resume_step` say."""
        config = ServerTrainConfig.from_json(msg.config)
        if safe_name(msg.run) != msg.run:
            raise ConfigError(f"run name {msg.run!r} may only hold letters, digits, '.', '_' and '-'")
        if not 0 <= msg.client < msg.clients:
            raise ConfigError(f"client {msg.client} is out of range for {msg.clients} client(s)")
        label = "shared" if config.share == "shared" else f"client{msg.client}"
        key = f"{msg.run}/{label}"
        with self.host.lock:
            self._expire()
            slot = self._slots.get(key)
            if slot is None or slot.attempt != msg.attempt:
                slot = self._new_slot(key, label, msg.attempt, config)
                if msg.resume_step:
                    self.checkpoints.load(self.stage, slot, msg.run, msg.resume_step)
            elif slot.config != config:
                raise ConfigError(f"adapter {key} is already training with other settings in this attempt")
            if msg.session not in self._sessions and len(self._sessions) >= self.host.limits.max_sessions:
                raise BusyError(f"node {self.node} is serving its maximum of {self.host.limits.max_sessions} sessions")
            self._sessions[msg.session] = _Session(slot, msg.run, msg.attempt, msg.client, msg.clients, self._clock())
            return {
                "node": self.node,
                "adapter": key,
                "layers": [self.stage.spec.start, self.stage.spec.end],
                "trainable_params": sum(p.numel() for p in slot.params),
                "optimizer_steps": slot.steps,
            }

    def close(self, session: str) -> None:
        """Forget a session (releasing its turn, and its adapter once no session uses it); closing an unknown
        session is not an error."""
        with self.host.lock:
            gone = self._sessions.pop(session, None)
            if gone is None:
                return
            self._turns.release(gone.slot, session)
            if all(s.slot is not gone.slot for s in self._sessions.values()):
                self._drop(gone.slot)  # nobody trains it any more; its checkpoints (if any) stay on disk

    def _drop(self, slot: AdapterSlot) -> None:
        for key in [k for k, v in self._slots.items() if v is slot]:
            del self._slots[key]
        drop_slot(self.stage, slot)

    def _expire(self) -> None:
        limit = self.host.limits.idle_timeout_s
        now = self._clock()
        for sid in [sid for sid, s in self._sessions.items() if now - s.last_used > limit]:
            log.info("training session %s expired after %.0f s idle", sid, limit)
            self.close(sid)

    def _new_slot(self, key: str, label: str, attempt: str, config: ServerTrainConfig) -> AdapterSlot:
        old = self._slots.get(key)
        if old is not None:  # a previous attempt of the run: its sessions are dead clients' sessions
            for sid in [sid for sid, sess in self._sessions.items() if sess.slot is old]:
                self.close(sid)
            self._drop(old)
        slot = new_slot(self.stage, self.layers_path, f"train{next(self._names)}", label, attempt, config)
        self._slots[key] = slot
        return slot

    def _session(self, session: str) -> _Session:
        self._expire()
        found = self._sessions.get(session)
        if found is None:
            raise SessionError(
                f"unknown training session {session!r} on node {self.node} (closed, expired, or the node restarted)"
            )
        found.last_used = self._clock()
        return found

    # -- forward and backward --------------------------------------------------------------------------------
    def forward(self, msg: TrainForward) -> ForwardReply:
        """Run the stage with the session's adapter, keeping the graph for the backward pass.

        data: [B, S, D] hidden states -> reply output [B, S, D]
        """
        with self.host.lock:
            s = self._session(msg.session)
            if msg.eval:
                return self._evaluate(s, msg)
            self._take_turn(s, msg.session)
            start = time.perf_counter()
            x = msg.data.detach().to(self.stage.dtype).requires_grad_(True)
            torch.manual_seed(seed_for(s.slot.config.seed, msg.step, self.stage.spec.start + 1))
            try:
                with torch.enable_grad(), use_adapter(self.stage, s.slot.name), self._qat(s):
                    out = self.stage(x, msg.positions, None, msg.token_mask)
            except BaseException:
                s.pending = None
                self._end_turn(s, msg.session)
                raise
            s.pending = (msg.step, x, out)
            return ForwardReply(out.detach(), (time.perf_counter() - start) * 1e3)

    def _evaluate(self, s: _Session, msg: TrainForward) -> ForwardReply:
        start = time.perf_counter()
        train_mode(self.stage, s.slot.name, False)
        try:
            with torch.no_grad(), use_adapter(self.stage, s.slot.name), self._qat(s):
                out = self.stage(msg.data.to(self.stage.dtype), msg.positions, None, msg.token_mask)
        finally:
            train_mode(self.stage, s.slot.name, True)
        return ForwardReply(out, (time.perf_counter() - start) * 1e3)

    def _qat(self, s: _Session) -> AbstractContextManager[None]:
        """The session's fake quantizers on for one pass (QAT), or every wrapper idle (`edgellm.qat`)."""
        return fake_quant_scope(self.stage, parse_quant(s.slot.config.qat))

    def backward(self, msg: TrainBackward) -> ForwardReply:
        """Backpropagate `msg.grad` (d loss / d output), step the optimizer, return d loss / d input."""
        with self.host.lock:
            s = self._session(msg.session)
            if s.pending is None or s.pending[0] != msg.step:
                have = "none" if s.pending is None else f"step {s.pending[0]}"
                raise SessionError(f"no training forward of step {msg.step} is pending on node {self.node} ({have})")
            _, x, out = s.pending
            if tuple(msg.grad.shape) != tuple(out.shape):
                raise ConfigError(f"gradient of shape {tuple(msg.grad.shape)} for an output of {tuple(out.shape)}")
            start = time.perf_counter()
            slot = s.slot
            try:
                out.backward(msg.grad.to(out.dtype))
                slot.last_grads = adapter_grads(self.stage, slot.name)
                slot.optimizer.step()
            finally:  # a failed step leaves no half-accumulated gradient and frees the adapter for the others
                slot.optimizer.zero_grad(set_to_none=True)
                s.pending = None
                self._end_turn(s, msg.session)
            slot.steps += 1
            assert x.grad is not None
            return ForwardReply(x.grad.detach(), (time.perf_counter() - start) * 1e3)

    def _take_turn(self, s: _Session, session: str) -> None:
        def forget_pending(owner: str) -> None:
            stale = self._sessions.get(owner)
            if stale is not None:
                stale.pending = None

        self._turns.take(s.slot, session, forget_pending)

    def _end_turn(self, s: _Session, session: str) -> None:
        self._turns.release(s.slot, session)

    # -- adapters ----------------------------------------------------------------------------------------------
    def sync(self, msg: AdapterSync) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """This node's part of an `AdapterSync` (the server routes it on); returns tensors and a detail."""
        if msg.op == "aggregate":
            return self._aggregate(msg)
        with self.host.lock:
            s = self._session(msg.session)
            slot = s.slot
            if msg.op == "get":
                tensors = adapter_state(self.stage, slot.name)
                if msg.grads:
                    tensors.update({f"grad:{k}": v for k, v in slot.last_grads.items()})
                return tensors, {"node": self.node, "optimizer_steps": slot.steps}
            if msg.op == "put":
                mine = stage_keys(self.stage, slot.name)
                missing = sorted(mine - {k for k, _ in msg.tensors})
                if missing:
                    raise ConfigError(
                        f"the adapter lacks {len(missing)} weight(s) of node {self.node}, e.g. {missing[0]}"
                    )
                load_adapter_state(self.stage, slot.name, {k: v for k, v in msg.tensors if k in mine})
                return {}, {"node": self.node, "loaded": len(mine)}
            return {}, self.checkpoints.save(self.stage, slot, s.run, msg.step)

    def _aggregate(self, msg: AdapterSync) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        with self.host.lock:
            s = self._session(msg.session)
            key = (s.run, s.attempt, msg.step)
            timeout, dp = s.slot.config.round_timeout_s, s.slot.config.dp_fedavg
        # Waiting for the other clients must not hold the stage: they need it to reach this round.
        result, included = self.aggregator.submit(key, s.client, s.clients, dict(msg.tensors), msg.weight, timeout, dp)
        return result, {"node": self.node, "round": msg.step, "clients": list(included)}
