"""One adapter being trained on a stage: its name in the stage's `LoRALinear` wrappers and its optimizer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from edgellm.lora.inject import adapter_parameters, inject_lora, set_active, train_mode
from edgellm.lora.linear import LoRALinear
from edgellm.model.stage import Stage
from edgellm.qat.walker import check_float_stage, unwrap_stage, wrap_stage
from edgellm.splitlearn.settings import ServerTrainConfig


@dataclass
class AdapterSlot:
    """One adapter on a stage and its optimizer."""

    name: str  # the adapter's name in the stage's LoRALinear wrappers
    label: str  # "shared" or "clientK": names the checkpoint folder
    attempt: str
    config: ServerTrainConfig
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    steps: int = 0  # optimizer steps taken
    last_grads: dict[str, torch.Tensor] = field(default_factory=dict)
    saved: set[int] = field(default_factory=set)  # client steps checkpointed in this attempt
    owner: str | None = None  # the session whose turn it is (shared adapters)
    owner_since: float = 0.0


def new_slot(
    stage: Stage, layers_path: str, name: str, label: str, attempt: str, config: ServerTrainConfig
) -> AdapterSlot:
    """Inject a fresh adapter `name` into `stage` (inactive for inference) with its own AdamW.

    With `config.qat` the stage's linear layers get fake quantizers (idle outside a QAT session's forward pass:
    `edgellm.qat.walker.fake_quant_scope`); LoRA goes inside them, so they quantize each merged weight.

    Raises:
        ConfigError: QAT on a stage whose linear layers are already quantized.
    """
    if config.qat is not None:
        check_float_stage(stage)
    wrapped = unwrap_stage(stage)  # LoRA wraps the float layers, the fake quantizers wrap LoRA
    inject_lora(stage, layers_path, config.lora, name)
    if wrapped or config.qat is not None:
        wrap_stage(stage)
    set_active(stage, None)  # inference sessions on this stage keep running the base model
    training = _training_adapters(stage)  # the other slots' adapters: they keep training
    stage.requires_grad_(False)  # the frozen base
    params = adapter_parameters(stage, name)
    for p in [*training, *params]:
        p.requires_grad_(True)
    train_mode(stage, name)  # adapter dropout on; the frozen base stays in eval mode
    optimizer = torch.optim.AdamW(params, **config.optim.adamw_kwargs())
    return AdapterSlot(name, label, attempt, config, params, optimizer)


def _training_adapters(stage: Stage) -> list[torch.nn.Parameter]:
    """The adapter weights of `stage` that train now (other clients' slots)."""
    return [
        p
        for module in stage.modules()
        if isinstance(module, LoRALinear)
        for adapter in module.adapters.values()
        for p in adapter.parameters()
        if p.requires_grad
    ]


def drop_slot(stage: Stage, slot: AdapterSlot) -> None:
    """Remove the slot's adapter from every wrapper of the stage."""
    for module in stage.modules():
        if isinstance(module, LoRALinear) and slot.name in module.adapters:
            module.remove_adapter(slot.name)
