"""Adapters on disk in peft's layout: `adapter_config.json` + `adapter_model.safetensors`.

What `save_peft_adapter` writes, `peft.PeftModel.from_pretrained` loads; what peft's `save_pretrained` writes for a
plain LoRA adapter, `load_peft_adapter` reads. In files a tensor is `"base_model.model.<module>.lora_A.weight"`;
in memory (`edgellm.lora.inject.adapter_state`) it is `"<module>.lora_A.weight"`.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from edgellm.errors import ConfigError
from edgellm.lora.config import ALL_LINEAR, LoraSpec

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FILE_PREFIX = "base_model.model."
# "<module>.lora_A.weight" (ours, peft's files) or "<module>.lora_A.<adapter>.weight" (peft's in-memory names).
_KEY = re.compile(r"(?P<module>.+)\.(?P<which>lora_A|lora_B)(?:\.[A-Za-z0-9_-]+)?\.weight")
# peft options that change the math or add tensors beyond plain LoRA; any truthy value is refused.
_REFUSED = (
    "use_dora",
    "use_rslora",
    "lora_bias",
    "modules_to_save",
    "rank_pattern",
    "alpha_pattern",
    "use_qalora",
    "alora_invocation_tokens",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "use_bdlora",
)


def _split_keys(tensors: Mapping[str, torch.Tensor], source: str) -> dict[str, dict[str, torch.Tensor]]:
    """module -> {"lora_A": A [r, in], "lora_B": B [out, r]}, checking each module has both."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.fullmatch(key)
        if match is None:
            raise ConfigError(f"{source}: tensor {key!r} is not a LoRA A or B weight")
        modules.setdefault(match["module"], {})[match["which"]] = tensor
    for module, pair in modules.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise ConfigError(f"{source}: module {module} has {sorted(pair)} but needs both lora_A and lora_B")
    return modules


def _targets(spec: LoraSpec, modules: Mapping[str, Any]) -> list[str]:
    """What the config's `target_modules` says: leaf names, or `spec`'s paths when it names modules by path."""
    if any("." in t for t in spec.target_modules):
        return sorted(spec.target_modules)
    return sorted({module.rsplit(".", 1)[-1] for module in modules})


def _check_ranks(modules: dict[str, dict[str, torch.Tensor]], r: int, source: str) -> None:
    for module, pair in modules.items():
        a, b = pair["lora_A"], pair["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise ConfigError(
                f"{source}: module {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                f"which do not fit rank r={r}"
            )


def save_peft_adapter(
    directory: Path,
    spec: LoraSpec,
    tensors: Mapping[str, torch.Tensor],
    base_model: str,
    fan_in_fan_out: bool = False,
) -> None:
    """Write an adapter as peft's `save_pretrained` does, replacing `directory` atomically.

    Args:
        tensors: the whole adapter, keyed as `adapter_state` (merge the stages' states first).
        base_model: written as `base_model_name_or_path`.
        fan_in_fan_out: True for GPT-2's Conv1D layers (peft's flag; it only matters to merging).

    The config's `target_modules` are the last names of the modules in `tensors` (e.g. "q_proj"), which is what
    peft matches when it loads the adapter; or, when `spec` names modules by path (`layers.12.self_attn.q_proj`:
    adapters on some layers only), `spec`'s own targets, so that a loader adapts those modules and no others.

    Raises:
        ConfigError: no tensors, malformed keys, shapes that do not fit `spec.r`, or `directory` exists and is not
            an adapter directory.
    """
    directory = Path(directory)
    modules = _split_keys(tensors, "save_peft_adapter")
    if not modules:
        raise ConfigError("save_peft_adapter: no adapter tensors to save")
    _check_ranks(modules, spec.r, "save_peft_adapter")
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": spec.r,
        "lora_alpha": int(spec.alpha) if spec.alpha.is_integer() else spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": _targets(spec, modules),
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "base_model_name_or_path": base_model,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    files = {FILE_PREFIX + key: t.detach().to("cpu", torch.float32).contiguous().clone() for key, t in tensors.items()}
    _write_atomically(directory, config, files)


def _write_atomically(directory: Path, config: dict[str, Any], files: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    if directory.exists() and not (directory.is_dir() and _replaceable(directory)):
        raise ConfigError(f"refusing to replace {directory}: it exists and is not an adapter directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(files, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if not directory.exists():
            tmp.rename(directory)
            return
        old = directory.parent / f".{directory.name}.{uuid.uuid4().hex}.old"
        directory.rename(old)
        try:
            tmp.rename(directory)
        except BaseException:
            old.rename(directory)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _replaceable(directory: Path) -> bool:
    """An adapter directory (or an empty one): never delete anything else in its place."""
    return (directory / CONFIG_FILE).is_file() or not any(directory.iterdir())


def load_peft_adapter(directory: Path) -> tuple[LoraSpec, dict[str, torch.Tensor]]:
    """Read an adapter written by `save_peft_adapter` or by peft's `save_pretrained`.

    Returns:
        (its spec, with the default `init_seed`; float32 tensors keyed as `adapter_state`).

    Raises:
        ConfigError: a missing or unreadable file, or an option plain LoRA does not have (DoRA, rsLoRA, biases,
            modules_to_save, per-module rank or alpha, ...); the message names the file and the field.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ConfigError(f"LoRA adapter file {path} is missing")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{config_path}: not readable JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{config_path}: expected a JSON object")
    spec = _spec_from_peft(config, str(config_path))
    try:
        raw = load_file(str(weights_path))
    except (OSError, SafetensorError) as exc:
        raise ConfigError(f"{weights_path}: not a readable safetensors file ({exc})") from None
    tensors = {}
    for key, tensor in raw.items():
        match = _KEY.fullmatch(key.removeprefix(FILE_PREFIX))
        if match is None:
            raise ConfigError(f"{weights_path}: tensor {key!r} is not a LoRA A or B weight")
        tensors[f"{match['module']}.{match['which']}.weight"] = tensor.to(torch.float32)
    modules = _split_keys(tensors, str(weights_path))
    if not modules:
        raise ConfigError(f"{weights_path}: holds no LoRA tensors")
    _check_ranks(modules, spec.r, str(weights_path))
    return spec, tensors


def _spec_from_peft(config: dict[str, Any], source: str) -> LoraSpec:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ConfigError(f"{source}: field peft_type is {peft_type!r}; only 'LORA' adapters are supported")
    bias = config.get("bias", "none")
    if bias != "none":
        raise ConfigError(f"{source}: field bias is {bias!r}; only 'none' is supported")
    for field in _REFUSED:
        if config.get(field):
            raise ConfigError(f"{source}: field {field} is {config[field]!r}; plain LoRA does not support it")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        if targets != ALL_LINEAR:
            raise ConfigError(f"{source}: field target_modules is a regular expression {targets!r}; give a list")
        targets = [targets]
    if not isinstance(targets, list) or not targets:
        raise ConfigError(f"{source}: field target_modules must be a non-empty list, got {targets!r}")
    try:
        return LoraSpec(
            r=config.get("r", 8),
            alpha=config.get("lora_alpha", 8),
            dropout=config.get("lora_dropout", 0.0),
            target_modules=tuple(sorted(targets)),
        )
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
