"""Put LoRA adapters into a stage's decoder blocks, switch between them, and move their tensors in and out.

Tensors are named by full-model module, `"<module>.lora_A.weight"` / `"<module>.lora_B.weight"` (e.g.
`"model.layers.3.self_attn.q_proj.lora_A.weight"`), so the adapters of split stages fit together into the one
adapter of the whole model, and peft's files map onto them by a prefix (`edgellm.lora.peft_io`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from edgellm.errors import ConfigError
from edgellm.lora.config import ALL_LINEAR, LoraSpec
from edgellm.lora.linear import LoRAAdapter, LoRALinear, check_adapter_name, linear_dims
from edgellm.model.stage import StageSpec

WEIGHTS = ("lora_A", "lora_B")


def _candidates(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(name relative to `module`, module) of every LoRALinear or linear-like module, not looking inside them."""
    for child_name, child in module.named_children():
        name = f"{prefix}.{child_name}" if prefix else child_name
        if isinstance(child, LoRALinear) or linear_dims(child) is not None:
            yield name, child
        else:
            yield from _candidates(child, name)


def _matches(full_name: str, targets: tuple[str, ...]) -> bool:
    """peft's rule for a list of targets: the name itself or a dotted suffix of it."""
    if targets == (ALL_LINEAR,):
        return True
    return any(full_name == t or full_name.endswith(f".{t}") for t in targets)


def _blocks(stage: nn.Module) -> nn.ModuleList:
    blocks = getattr(stage, "blocks", None)
    return blocks if isinstance(blocks, nn.ModuleList) else nn.ModuleList()


def wrappers(stage: nn.Module) -> list[LoRALinear]:
    """Every LoRALinear in `stage`, in module order."""
    return [m for m in stage.modules() if isinstance(m, LoRALinear)]


def _common_active(found: list[LoRALinear]) -> str | None:
    actives = {w.active for w in found}
    return actives.pop() if len(actives) == 1 else None


def inject_lora(stage: nn.Module, layers_path: str, spec: LoraSpec, name: str) -> dict[str, LoRALinear]:
    """Give the target modules of `stage.blocks` an adapter `name`, wrapping them in LoRALinear where needed.

    Block `i` of the stage is layer `stage.spec.start + i` of the model. The first injection into a stage makes
    `name` active (as peft's `get_peft_model` does); later ones leave the active adapter as it was. Modules other
    than the wrapped bases keep their `requires_grad`: train with `adapter_parameters`.

    Args:
        layers_path: where the model keeps its blocks, `arch_for(config).layers` ("model.layers", "transformer.h").

    Returns:
        {full-model module name, e.g. "model.layers.3.self_attn.q_proj": its wrapper}; {} for a stage without
        blocks (a head-only stage).

    Raises:
        ConfigError: no module matches the targets (the message lists the linear modules of a block), the
            adapter name is invalid or already used on a matched module.
    """
    check_adapter_name(name)
    blocks = _blocks(stage)
    if not len(blocks):
        return {}
    spec_of_stage = getattr(stage, "spec", None)
    if not isinstance(spec_of_stage, StageSpec):
        raise ConfigError(f"inject_lora needs a Stage (with a StageSpec), got {type(stage).__name__}")
    start = spec_of_stage.start
    existing = wrappers(stage)
    chosen: dict[str, tuple[nn.Module, str, nn.Module]] = {}  # full name -> (block, name in block, module)
    available: set[str] = set()
    for i, block in enumerate(blocks):
        for sub, module in _candidates(block):
            available.add(sub)
            full = f"{layers_path}.{start + i}.{sub}"
            if _matches(full, spec.target_modules):
                chosen[full] = (block, sub, module)
    if not chosen:
        raise ConfigError(
            f"no module matches LoRA targets {list(spec.target_modules)}; linear modules in a block: "
            f"{sorted(available)} (or {ALL_LINEAR!r})"
        )
    for full, (_, _, module) in chosen.items():
        if isinstance(module, LoRALinear) and name in module.adapters:
            raise ConfigError(f"adapter {name!r} already exists on {full}")
    active = name if not existing else _common_active(existing)
    out: dict[str, LoRALinear] = {}
    for full, (block, sub, module) in chosen.items():
        if isinstance(module, LoRALinear):
            wrapper = module
        else:
            wrapper = LoRALinear(module)
            wrapper.active = active
            wrapper.train(block.training)  # the stage's mode, whatever mode the module swapped in was left in
            block.set_submodule(sub, wrapper)
        wrapper.add_adapter(name, spec, full)
        out[full] = wrapper
    return out


def set_active(stage: nn.Module, name: str | None) -> None:
    """Make adapter `name` (None: none) the active one of every LoRALinear in `stage`.

    Raises:
        ConfigError: the stage has adapters but none called `name` (the message lists them).
    """
    found = wrappers(stage)
    if name is not None and found and not any(name in w.adapters for w in found):
        names = sorted({n for w in found for n in w.adapters})
        raise ConfigError(f"no adapter {name!r} in this stage; adapters: {names}")
    for w in found:
        w.active = name


@contextlib.contextmanager
def use_adapter(stage: nn.Module, name: str | None) -> Iterator[None]:
    """Within the block, run `stage` with adapter `name` (None: the base model); restore the previous state after.

    Raises:
        ConfigError: as `set_active`.
    """
    saved = [(w, w.active) for w in wrappers(stage)]
    set_active(stage, name)
    try:
        yield
    finally:
        for w, active in saved:
            w.active = active


def _adapters(stage: nn.Module, name: str) -> list[LoRAAdapter]:
    return [w.adapter(name) for w in wrappers(stage) if name in w.adapters]


def _named_weights(stage: nn.Module, name: str) -> Iterator[tuple[str, nn.Parameter]]:
    for adapter in _adapters(stage, name):
        for which in WEIGHTS:
            param = getattr(adapter, which).weight
            assert isinstance(param, nn.Parameter)
            yield f"{adapter.full_name}.{which}.weight", param


def adapter_parameters(stage: nn.Module, name: str) -> list[nn.Parameter]:
    """The trainable tensors of adapter `name` in `stage` (A and B of each wrapped module), for an optimizer."""
    return [param for _, param in _named_weights(stage, name)]


def stage_keys(stage: nn.Module, name: str) -> set[str]:
    """The tensor names adapter `name` has in `stage` ("<full module name>.lora_A.weight", ...)."""
    return {key for key, _ in _named_weights(stage, name)}


def adapter_state(stage: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Detached copies of adapter `name`'s tensors in `stage`, by full-model name."""
    return {key: param.detach().clone() for key, param in _named_weights(stage, name)}


def adapter_grads(stage: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Copies of the gradients of adapter `name`'s tensors (zeros where there is none), keyed as `adapter_state`."""
    return {
        key: torch.zeros_like(param) if param.grad is None else param.grad.detach().clone()
        for key, param in _named_weights(stage, name)
    }


def _layer_prefixes(stage: nn.Module, name: str) -> tuple[str, ...]:
    """`"model.layers.3."` for each block of `stage` holding adapter `name`: what a key of this stage starts with."""
    prefixes = set()
    for block in _blocks(stage):
        for sub, module in block.named_modules():
            if isinstance(module, LoRALinear) and name in module.adapters:
                full = module.adapter(name).full_name
                prefixes.add(full[: len(full) - len(sub)])
    return tuple(prefixes)


def load_adapter_state(stage: nn.Module, name: str, tensors: Mapping[str, torch.Tensor], strict: bool = True) -> None:
    """Copy `tensors` (keyed as `adapter_state`) into adapter `name` of `stage`.

    With `strict`, every tensor of the stage's adapter must be given and every given tensor must belong to it.
    Without, tensors of layers this stage does not hold are skipped and absent ones keep their values; a tensor
    for one of the stage's own layers that the adapter lacks is still an error.

    Raises:
        ConfigError: missing keys (strict), unexpected keys, or a shape mismatch; the message names the key.
    """
    own = dict(_named_weights(stage, name))
    missing = sorted(set(own) - set(tensors))
    if strict and missing:
        raise ConfigError(f"adapter {name!r}: missing tensors {missing[:5]} ({len(missing)} in all)")
    prefixes = _layer_prefixes(stage, name)
    unexpected = sorted(k for k in tensors if k not in own and (strict or k.startswith(prefixes)))
    if unexpected:
        raise ConfigError(f"adapter {name!r}: unexpected tensors {unexpected[:5]} ({len(unexpected)} in all)")
    for key, param in own.items():
        if key in tensors and tuple(tensors[key].shape) != tuple(param.shape):
            raise ConfigError(
                f"adapter {name!r}: tensor {key} has shape {tuple(tensors[key].shape)}, expected {tuple(param.shape)}"
            )
    with torch.no_grad():
        for key, param in own.items():
            if key in tensors:
                param.copy_(tensors[key])


def train_mode(stage: nn.Module, name: str, on: bool = True) -> None:
    """Put adapter `name`'s modules (its dropout) in training mode, leaving the frozen base as it is."""
    for adapter in _adapters(stage, name):
        adapter.train(on)
