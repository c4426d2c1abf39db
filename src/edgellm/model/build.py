"""Build a `Stage` from a Hugging Face config and a source of named weight tensors.

Only the stage's own modules are materialized and only their tensors are read, so a node holding layers
[10, 20) of a model never allocates the rest.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from edgellm.errors import ModelError
from edgellm.model.arch import Arch, arch_for, get_module, layer_types, max_positions, sliding_window
from edgellm.model.stage import ModelDims, Stage, StageSpec, Traits

# Full-model parameter name (e.g. "model.layers.3.mlp.up_proj.weight") -> tensor. Raises KeyError if absent.
TensorSource = Callable[[str], torch.Tensor]


def build_stages(
    config: Any, specs: Sequence[StageSpec], tensors: TensorSource, dtype: torch.dtype = torch.float32
) -> list[Stage]:
    """`build_stage` for several specs of one model, sharing one meta-device skeleton (specs must not overlap)."""
    config = _sdpa_config(config)
    skeleton = _skeleton(config, dtype)
    return [build_stage(config, spec, tensors, dtype, skeleton) for spec in specs]


def build_stage(
    config: Any,
    spec: StageSpec,
    tensors: TensorSource,
    dtype: torch.dtype = torch.float32,
    skeleton: nn.Module | None = None,
) -> Stage:
    """Materialize the modules of `spec` and load their weights.

    Args:
        skeleton: the model built on the meta device by an earlier call for the same config and dtype; the
            stage takes its modules out of it, so two stages must not share one skeleton for the same layers.

    Raises:
        ModelError: unsupported architecture, layers out of range, or weights missing from the source.
    """
    arch = arch_for(config)
    num_layers = int(config.num_hidden_layers)
    if spec.end > num_layers:
        raise ModelError(f"stage layers [{spec.start}, {spec.end}) exceed the model's {num_layers} layers")
    config = _sdpa_config(config)
    if skeleton is None:
        skeleton = _skeleton(config, dtype)
    named = _select(skeleton, arch, spec)  # full-model prefix -> module, still on the meta device
    parts: dict[str, nn.Module] = {key: module for key, (_, module) in named.items()}
    if spec.num_layers:
        layers = get_module(skeleton, arch.layers)
        assert isinstance(layers, nn.ModuleList)
        parts["blocks"] = nn.ModuleList(layers[i] for i in range(spec.start, spec.end))
    stage = Stage(spec, arch.call, parts, _dims(config), stage_traits(config, arch, spec))
    stage.to_empty(device="cpu")
    for prefix, module in _loadable(named, arch, spec, stage):
        _load(module, prefix, tensors, config, arch)
    if spec.num_layers and arch.rotary is not None:
        # Rotary frequencies are non-persistent buffers (not in checkpoints): rebuild them for real.
        stage.rotary = type(get_module(skeleton, arch.rotary))(config=config)
    if spec.embed and spec.head and getattr(config, "tie_word_embeddings", False):
        stage.head.weight = stage.embed.weight  # type: ignore[union-attr]  # one matrix, as in the checkpoint
    return stage.eval()


def meta_stages(config: Any, specs: Sequence[StageSpec], dtype: torch.dtype = torch.float32) -> list[Stage]:
    """The stages `specs` with every module on the meta device: their shapes and dtypes, no memory, no weights.

    For sizing a node's stages before loading them (`quant.memory.planned_weight_bytes`). As in `build_stage`, a
    stage holding both the embedding and a tied head shares one matrix (the skeleton ties them); separate stages
    each count their own.

    Raises:
        ModelError: unsupported architecture, or layers out of range.
    """
    arch = arch_for(config)
    num_layers = int(config.num_hidden_layers)
    skeleton = _skeleton(_sdpa_config(config), dtype)
    stages = []
    for spec in specs:
        if spec.end > num_layers:
            raise ModelError(f"stage layers [{spec.start}, {spec.end}) exceed the model's {num_layers} layers")
        parts: dict[str, nn.Module] = {key: module for key, (_, module) in _select(skeleton, arch, spec).items()}
        if spec.num_layers:
            layers = get_module(skeleton, arch.layers)
            assert isinstance(layers, nn.ModuleList)
            parts["blocks"] = nn.ModuleList(layers[i] for i in range(spec.start, spec.end))
        stages.append(Stage(spec, arch.call, parts, _dims(config), stage_traits(config, arch, spec)))
    return stages


def stage_traits(config: Any, arch: Arch, spec: StageSpec) -> Traits:
    """The `Traits` of stage `spec` of a model with Hugging Face `config`."""
    cap = getattr(config, "final_logit_softcapping", None)
    return Traits(
        layer_types=layer_types(config)[spec.start : spec.end],
        window=sliding_window(config),
        rotary_by_type=arch.rotary_by_type,
        embed_scale=arch.embed_scale(config) if arch.embed_scale is not None and spec.embed else None,
        logit_softcap=float(cap) if cap is not None and spec.head else None,
    )


def _dims(config: Any) -> ModelDims:
    return ModelDims(int(config.hidden_size), int(config.vocab_size), max_positions(config))


def _sdpa_config(config: Any) -> Any:
    if getattr(config, "_attn_implementation", None) == "sdpa":
        return config
    config = copy.deepcopy(config)
    config._attn_implementation = "sdpa"
    return config


def _skeleton(config: Any, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.to(dtype)


def _select(skeleton: nn.Module, arch: Arch, spec: StageSpec) -> dict[str, tuple[str, nn.Module]]:
    wanted: dict[str, str | None] = {}
    if spec.embed:
        wanted["embed"] = arch.embed
        wanted["pos_embed"] = arch.pos_embed
    if spec.head:
        wanted["norm"] = arch.norm
        wanted["head"] = arch.head
    if spec.num_layers and arch.rotary:
        wanted["rotary"] = arch.rotary
    selected = {key: (path, get_module(skeleton, path)) for key, path in wanted.items() if path}
    if "embed" in selected and arch.embed_scale is not None:
        # The stage applies the scale (`Traits.embed_scale`): a plain table, which the quantizer and the weight
        # files handle as any other, in place of transformers' scaled embedding (its scale a computed buffer).
        path, scaled = selected["embed"]
        assert isinstance(scaled, nn.Embedding)
        plain = nn.Embedding(scaled.num_embeddings, scaled.embedding_dim, scaled.padding_idx, device="meta")
        plain.weight = scaled.weight  # the same parameter: a tied head stays tied
        selected["embed"] = (path, plain)
    return selected


def _loadable(
    named: dict[str, tuple[str, nn.Module]], arch: Arch, spec: StageSpec, stage: Stage
) -> list[tuple[str, nn.Module]]:
    """(full-model prefix, module) for every module whose weights come from the checkpoint."""
    out = [(path, module) for key, (path, module) in named.items() if key != "rotary"]
    for i, block in zip(range(spec.start, spec.end), stage.blocks):
        for mod_name, mod in block.named_modules():
            if mod._non_persistent_buffers_set:
                # Such a buffer is computed at construction, which the meta-device skeleton skipped.
                raise ModelError(f"unsupported: block module {mod_name or type(mod).__name__} has computed buffers")
        out.append((f"{arch.layers}.{i}", block))
    return out


def _load(module: nn.Module, prefix: str, tensors: TensorSource, config: Any, arch: Arch) -> None:
    for name, param in list(module.named_parameters()) + list(_persistent_buffers(module)):
        full = f"{prefix}.{name}"
        value = _fetch(full, tensors, config, arch)
        if value.shape != param.shape:
            raise ModelError(f"weight {full} has shape {tuple(value.shape)}, the config implies {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(value)


def _fetch(name: str, tensors: TensorSource, config: Any, arch: Arch) -> torch.Tensor:
    candidates = [name]
    if name == f"{arch.head}.weight" and getattr(config, "tie_word_embeddings", False):
        candidates.append(f"{arch.embed}.weight")
    base = arch.layers.split(".")[0]  # older checkpoints omit the base model's prefix ("transformer." in GPT-2)
    candidates += [c.removeprefix(f"{base}.") for c in list(candidates) if c.startswith(f"{base}.")]
    for candidate in candidates:
        try:
            return tensors(candidate)
        except KeyError:
            continue
    raise ModelError(f"weight {name} is missing from the model files")


def _persistent_buffers(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    out = []
    for mod_name, mod in module.named_modules():
        for buf_name, buf in mod.named_buffers(recurse=False):
            if buf_name not in mod._non_persistent_buffers_set:
                out.append((f"{mod_name}.{buf_name}" if mod_name else buf_name, buf))
    return out
