"""Split fine-tuning in this process with a tap on the wire: the tensors an edge server receives, exactly.

The device model is the project's `SplitModel`, with its own DP defence (`edgellm.privacy.mods`: the smashed data
clipped and noised before it leaves, and, with a gradient bound, the gradients sent back); its one server hop
(layers [k, L)) is a `StageServer` with a `TrainHost`, reached through `TapHop`, which records every
`TrainForward.data` and `TrainBackward.grad` on their way to the server: what the server receives, exactly.
The same setup fine-tunes the adapters with noise at the cut and scores the task's exact match through it
(`greedy_exact_match`), for the utility column of `edgellm eval privacy --task` and bench/privacy.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from edgellm.lora.config import LoraSpec
from edgellm.model.arch import arch_for
from edgellm.model.stage import stage_specs
from edgellm.net.direct_hop import LocalHop
from edgellm.net.messages import TrainBackward, TrainForward, TrainOpen
from edgellm.privacy.config import DPConfig, TrainPrivacy
from edgellm.split.host import StageHost
from edgellm.split.one_process import load_stages
from edgellm.split.server import InProcessServer, StageServer
from edgellm.splitlearn.device_model import SplitModel
from edgellm.splitlearn.server_host import TrainHost
from edgellm.splitlearn.settings import OptimSpec, ServerTrainConfig
from edgellm.store.weights import load_config
from edgellm.train.data import Batch, encode_example, pad_right, prompt_ids
from edgellm.train.tasks import Example, exact_match

SERVER = "edge1"


@dataclass
class TapHop:
    """A `TrainHop` in front of the server that records the training traffic it receives (`record` off: nothing)."""

    inner: Any
    name: str = SERVER
    record: bool = True
    sent_hidden: list[torch.Tensor] = field(default_factory=list)  # [B, S, D] per training forward, as received
    sent_grads: list[torch.Tensor] = field(default_factory=list)  # [B, S, D] per backward, as received

    def forward(self, request: Any) -> Any:
        return self.inner.forward(request)

    def close(self, request: Any) -> None:
        self.inner.close(request)

    def train(self, message: Any, wait_s: float = 0.0) -> Any:
        if isinstance(message, TrainForward):
            if self.record and not message.eval:
                self.sent_hidden.append(message.data.detach().clone())
        elif isinstance(message, TrainBackward) and self.record:
            self.sent_grads.append(message.grad.detach().clone())
        return self.inner.train(message, wait_s)


@dataclass
class SplitTraining:
    """A device model and its one server hop, cut at `cut`, with the head on the device."""

    model: SplitModel
    tap: TapHop
    optimizer: torch.optim.Optimizer


def split_training(
    model_dir: Path, cut: int, lora: LoraSpec, optim: OptimSpec, dp: DPConfig | None, seed: int = 0
) -> SplitTraining:
    """Load the model cut at `cut` (device: embedding + [0, cut) and the head; server: [cut, L)), open a session
    with the device's defence `dp` (None: none)."""
    config = load_config(model_dir)
    layers = arch_for(config).layers
    stages = load_stages(model_dir, stage_specs(int(config.num_hidden_layers), (cut,), "device"))
    host = StageHost(stages[1])
    server = StageServer(SERVER, host, {}, trainer=TrainHost(host, layers, SERVER))
    tap = TapHop(LocalHop(SERVER, InProcessServer(server)))
    privacy = TrainPrivacy(smashed=dp)
    model = SplitModel([stages[0], stages[2]], [tap], layers, lora, "privacy", privacy=privacy)
    settings = ServerTrainConfig(lora=lora, optim=optim, seed=seed).to_json()
    model.open(TrainOpen("privacy", "privacy", f"seed{seed}", 0, 1, settings))
    optimizer = torch.optim.AdamW(model.params, **optim.adamw_kwargs())
    return SplitTraining(model, tap, optimizer)


def task_batch(tokenizer: Any, examples: Sequence[Example], pad_id: int) -> Batch:
    """The training batch of `examples` (loss on the response and EOS), right-padded as the trainer pads."""
    return pad_right([encode_example(tokenizer, e) for e in examples], pad_id)


def train_steps(
    run: SplitTraining, batches: Sequence[Batch], seed: int = 0, on_step: Callable[[int, int], None] | None = None
) -> list[float]:
    """One optimizer step per batch (the server steps its own adapters in the backward); returns the losses."""
    losses = []
    for step, batch in enumerate(batches):
        loss, _ = run.model.loss(batch, step, seed)
        loss.backward()
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step + 1, len(batches))
    return losses


def greedy_exact_match(
    run: SplitTraining, tokenizer: Any, examples: Sequence[Example], stop: int, max_new_tokens: int, batch: int = 25
) -> float:
    """Exact match of greedy answers decoded through the split (noise at the cut included, fresh each pass).

    Without a KV cache: each pass re-sends the whole prefix, so every pass draws new noise for every row.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop
    record, run.tap.record = run.tap.record, False
    correct = 0
    try:
        for start in range(0, len(examples), batch):
            chunk = examples[start : start + batch]
            seqs = [prompt_ids(tokenizer, e.prompt) for e in chunk]
            answers: list[list[int]] = [[] for _ in chunk]
            done = [False] * len(chunk)
            for _ in range(max_new_tokens):
                rows = [(s + a, [0] * len(s + a)) for s, a in zip(seqs, answers)]
                logits = run.model.logits(pad_right(rows, pad_id))  # [B, S, V]
                for b, (ids, _) in enumerate(rows):
                    token = int(logits[b, len(ids) - 1].argmax())
                    if not done[b]:
                        done[b] = token == stop
                        if not done[b]:
                            answers[b].append(token)
                if all(done):
                    break
            for e, a in zip(chunk, answers):
                correct += exact_match(tokenizer.decode(a, skip_special_tokens=True), e.response)
    finally:
        run.tap.record = record
    return correct / len(examples) if examples else 0.0
