"""Quantized stages on disk: one safetensors file per stage, so a node quantizes once and then just loads.

Tensors are keyed by their *full-model* names, as in the model's own checkpoint: a quantized layer at
`model.layers.3.mlp.up_proj` is stored as `...up_proj.qweight`, `.scales`, `.zeros` (int4) and `.bias` (if any),
in the portable layout of `edgellm.quant.tensor`; the layers left in floating point keep their names
(`model.norm.weight`). The metadata says which stage the file holds, the scheme of each quantized module, and the
model it came from; loading checks all three.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgellm.errors import ModelError
from edgellm.model.arch import Arch, arch_for, get_module
from edgellm.model.build import build_stage
from edgellm.model.stage import Stage, StageSpec
from edgellm.progress import Phase
from edgellm.quant.calibration import stage_hessians
from edgellm.quant.modules import QuantEmbedding, is_quantized, quant_linear
from edgellm.quant.scheme import QuantConfig, needs_calibration
from edgellm.quant.tensor import QuantizedWeight
from edgellm.quant.walker import float_weight, quantize_module, quantized_modules
from edgellm.store.paths import quant_dir, quant_model_key
from edgellm.store.weights import SafetensorsSource, load_config

log = logging.getLogger(__name__)

FORMAT = "edgellm-quant-stage"
VERSION = "1"
_MODEL_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size")


def model_fingerprint(model_config: Any) -> dict[str, Any]:
    """The config fields a quantized stage file must agree with."""
    return {key: getattr(model_config, key, None) for key in _MODEL_KEYS}


def full_name(stage_name: str, arch: Arch, spec: StageSpec) -> str:
    """A stage-relative name (`blocks.0.mlp.up_proj`) -> the full-model name (`model.layers.10.mlp.up_proj`)."""
    part, _, rest = stage_name.partition(".")
    if part == "blocks":
        index, _, rest = rest.partition(".")
        base = f"{arch.layers}.{spec.start + int(index)}"
    else:
        paths = {"embed": arch.embed, "pos_embed": arch.pos_embed, "norm": arch.norm, "head": arch.head}
        if paths.get(part) is None:
            raise ModelError(f"stage part {part!r} has no place in a {arch.layers} checkpoint")
        base = str(paths[part])
    return f"{base}.{rest}" if rest else base


def save_stage(stage: Stage, path: Path, model_config: Any, config: QuantConfig) -> None:
    """Write a quantized stage to `path` (atomically: a reader never sees half a file)."""
    from safetensors.torch import save_file

    arch = arch_for(model_config)
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, dict[str, Any]] = {}
    quantized = quantized_modules(stage)
    for name, module in quantized.items():
        full = full_name(name, arch, stage.spec)
        qw: QuantizedWeight = module.quantized()  # type: ignore[operator]
        tensors.update({f"{full}.{key}": t.contiguous() for key, t in qw.tensors().items()})
        bias = getattr(module, "bias", None)
        if bias is not None:
            tensors[f"{full}.bias"] = bias.contiguous()
        n, k = qw.shape
        transposed = getattr(module, "transposed", False)
        modules[full] = {"scheme": qw.scheme, "embedding": isinstance(module, QuantEmbedding),
                         "weight_shape": [k, n] if transposed else [n, k]}  # fmt: skip
    for name, t in stage.state_dict().items():
        owner = name.rpartition(".")[0]
        if not any(owner == q or owner.startswith(f"{q}.") for q in quantized):
            tensors[full_name(name, arch, stage.spec)] = t.detach().clone().contiguous()  # clone: unties shared
    spec = stage.spec
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "quant": config.text,
        "spec": json.dumps([spec.start, spec.end, spec.embed, spec.head]),
        "model": json.dumps(model_fingerprint(model_config)),
        "modules": json.dumps(modules),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _check(metadata: dict[str, str] | None, path: Path, model_config: Any, spec: StageSpec) -> dict[str, Any]:
    if not metadata or metadata.get("format") != FORMAT:
        raise ModelError(f"{path} is not a quantized edgellm stage")
    if metadata.get("version") != VERSION:
        raise ModelError(f"{path} has format version {metadata.get('version')}; this edgellm reads {VERSION}")
    want = json.loads(json.dumps(model_fingerprint(model_config)))
    if json.loads(metadata["model"]) != want:
        raise ModelError(f"{path} was quantized from another model ({metadata['model']}, not {json.dumps(want)})")
    if json.loads(metadata["spec"]) != [spec.start, spec.end, spec.embed, spec.head]:
        raise ModelError(f"{path} holds stage {metadata['spec']}, not {spec}")
    return json.loads(metadata["modules"])


def load_stage(path: Path, model_config: Any, spec: StageSpec, dtype: torch.dtype = torch.float32) -> Stage:
    """Read a stage written by `save_stage`; its quantized modules are bit-identical to the saved ones.

    The floating-point skeleton is built first (placeholders for quantized weights, so nothing is dequantized),
    then each quantized module is put in place from the file's codes and scales.

    Raises:
        ModelError: not such a file, another model or another stage, or tensors missing.
    """
    from safetensors import safe_open

    arch = arch_for(model_config)
    with safe_open(str(path), framework="pt") as f:
        modules = _check(f.metadata(), path, model_config, spec)
        keys = set(f.keys())

        def source(name: str) -> torch.Tensor:
            if name in keys:
                return f.get_tensor(name)
            prefix = name.removesuffix(".weight")
            if name.endswith(".weight") and prefix in modules:
                return torch.zeros((), dtype=dtype).expand(modules[prefix]["weight_shape"])
            raise KeyError(name)

        stage = build_stage(model_config, spec, source, dtype)
        for name in [n for n, m in stage.named_modules() if float_weight(m) is not None or isinstance(m, nn.Embedding)]:
            full = full_name(name, arch, spec)
            if full in modules:
                _set(stage, name, _read_module(f, keys, full, modules[full], dtype))
        for name, t in stage.state_dict(keep_vars=True).items():  # float tensors, untied from replaced modules
            owner = get_module(stage, name.rpartition(".")[0]) if "." in name else stage
            if not is_quantized(owner):
                with torch.no_grad():
                    t.copy_(f.get_tensor(full_name(name, arch, spec)))
    return stage.eval()


def _read_module(f: Any, keys: set[str], full: str, entry: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    try:

        def read(key: str) -> torch.Tensor:  # a copy: the file's tensors may be views of a mapping closed later
            return f.get_tensor(f"{full}.{key}").clone()

        zeros = read("zeros") if f"{full}.zeros" in keys else None
        qweight, scales = read("qweight"), read("scales")
        n, k = qweight.shape[0], qweight.shape[1] * (1 if qweight.dtype == torch.int8 else 2)
        qw = QuantizedWeight(entry["scheme"], (n, k), qweight, scales, zeros)
        if entry["embedding"]:
            return QuantEmbedding(qw, dtype)
        bias = read("bias") if f"{full}.bias" in keys else None
        module = quant_linear(qw, bias)
        module.transposed = list(entry["weight_shape"]) != [n, k]
        return module
    except (KeyError, RuntimeError) as exc:
        raise ModelError(f"quantized module {full} is incomplete in the file: {exc}") from exc


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(get_module(root, parent) if parent else root, leaf, module)


def cache_path(model_dir: Path, spec: StageSpec, config: QuantConfig) -> Path:
    """Where `load_or_quantize` keeps a stage: under the edgellm home, keyed by the weights file and the scheme."""
    rules = "-r" + hashlib.sha256(config.text.encode()).hexdigest()[:8] if config.rules else ""
    parts = "".join(p for p, on in (("+embed", spec.embed), ("+head", spec.head)) if on)
    name = f"{config.scheme}{rules}-L{spec.start}-{spec.end}{parts}.safetensors"
    return quant_dir() / quant_model_key(model_dir) / name


def quantize_stage(model_dir: Path, stage: Stage, config: QuantConfig) -> Stage:
    """Quantize a float `stage` of the model in `model_dir` in place, with calibration statistics when a scheme
    of `config` needs them (`*-gptq`: `edgellm.quant.calibration`), and a progress bar over its modules.

    Raises:
        ConfigError: as `quantize_module`.
    """
    hessians = stage_hessians(model_dir, stage) if needs_calibration(config) else None
    total = sum(
        1
        for name, m in stage.named_modules()
        if (isinstance(m, nn.Embedding) or float_weight(m) is not None) and config.scheme_for(name) is not None
    )
    with Phase("quantize modules", total=total, unit="modules", log=log) as phase:
        quantize_module(stage, config, hessians=hessians, on_module=lambda _: phase.advance())
    return stage


def load_or_quantize(
    model_dir: Path, spec: StageSpec, config: QuantConfig, dtype: torch.dtype = torch.float32, cache: bool = True
) -> Stage:
    """The stage `spec` of the model in `model_dir`, quantized with `config`: from the cache when it is there,
    else built from the float weights, quantized, and (with `cache`) saved for the next start.

    Raises:
        ModelError, ConfigError: as `build_stage` and `quantize_module`.
    """
    model_config = load_config(model_dir)
    path = cache_path(model_dir, spec, config)
    parts = "".join(f"+{part}" for part, on in (("embed", spec.embed), ("head", spec.head)) if on)
    label = f"stage [{spec.start}:{spec.end}){parts} ({config.text})"
    if cache and path.is_file():
        with Phase(f"load quantized {label}", log=log) as phase:
            phase.summary = f"from {path}"
            return load_stage(path, model_config, spec, dtype)
    with Phase(f"quantize {label}", log=log, announce=f"quantizing {label}") as phase:
        with SafetensorsSource(model_dir) as tensors:
            stage = build_stage(model_config, spec, tensors, dtype)
        quantize_stage(model_dir, stage, config)
        if cache:
            save_stage(stage, path, model_config, config)
            phase.summary = f"saved to {path}"
    return stage
