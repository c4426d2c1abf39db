"""Export a QAT (or fully fine-tuned) model: a model directory with its trained float weights, and the quantized
stage files PTQ would write for it.

    DIR/model/config.json, tokenizer files ...   copied from the source model
    DIR/model/model.safetensors                  the source weights, with the trained layers and merged adapters
    DIR/model/qat.json                           where it came from: source model, scheme, layers, LoRA, run
    $EDGELLM_HOME/quant/<model key>/<scheme>-L0-<L>+embed+head.safetensors   (with --qat) the quantized stage

The quantized stage is what `edgellm.quant.stage_files.load_or_quantize` finds for `--model DIR/model --quant
SCHEME` (so `edgellm generate`, `eval ppl`, `serve`, ... load it as they load PTQ's); its metadata says
`origin = qat`. Quantization is a pure function of the float weights, so a stage cut anywhere else is
quantized from `model.safetensors` on first use into exactly the weights QAT trained with.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from edgellm.errors import ModelError
from edgellm.model.build import build_stage
from edgellm.model.stage import StageSpec
from edgellm.qat.fake_quant import merge_lora
from edgellm.quant.scheme import QuantConfig
from edgellm.quant.stage_files import cache_path, save_stage
from edgellm.quant.walker import quantize_module
from edgellm.store.paths import replace_dir
from edgellm.store.weights import SafetensorsSource, load_config

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
RECORD = "qat.json"
ORIGIN = "qat"


def merged_tensors(
    model_dir: Path,
    trained: Mapping[str, torch.Tensor],
    adapters: Mapping[str, torch.Tensor],
    scaling: float,
    transposed: bool = False,
) -> dict[str, torch.Tensor]:
    """The model's weights by stored name, with `trained` ones replaced and each adapter merged into its layer.

    Args:
        trained: full-model parameter name -> trained value (written as float32).
        adapters: `"<module>.lora_A.weight"` / `"<module>.lora_B.weight"` -> tensor, as `edgellm.lora` names them.
        scaling: LoRA's alpha / r.
        transposed: the model's linear weights are stored `[in, out]` (GPT-2's Conv1D).

    Raises:
        ModelError: a name that is not in the model's weights, or an adapter missing its A or B.
    """
    with SafetensorsSource(model_dir) as source:
        tensors = {name: source(name) for name in source.names()}
    for name, value in trained.items():
        _known(tensors, name, model_dir)
        tensors[name] = value.detach().float().clone()
    modules = sorted({key.rsplit(".lora_", 1)[0] for key in adapters})
    for module in modules:
        a, b = adapters.get(f"{module}.lora_A.weight"), adapters.get(f"{module}.lora_B.weight")
        if a is None or b is None:
            raise ModelError(f"adapter of {module} lacks its lora_A or lora_B weight")
        name = f"{module}.weight"
        _known(tensors, name, model_dir)
        weight = tensors[name].t() if transposed else tensors[name]  # [N, K], as the forward reads it
        merged = merge_lora(weight, a, b, scaling)
        tensors[name] = (merged.t() if transposed else merged).contiguous()
    return tensors


def _known(tensors: Mapping[str, torch.Tensor], name: str, model_dir: Path) -> None:
    if name not in tensors:
        raise ModelError(f"cannot export {name}: {model_dir}'s weights have no tensor of that name")


def write_model(model_dir: Path, target: Path, tensors: dict[str, torch.Tensor], record: dict[str, Any]) -> None:
    """Write `tensors` as a model directory at `target` (replacing one there only once the new one is complete),
    with every other file of `model_dir` (config, tokenizer, chat template) and the record `qat.json`."""
    from safetensors.torch import save_file

    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for path in model_dir.iterdir():
        if path.is_file() and path.name not in WEIGHT_FILES and not path.name.endswith((".safetensors", ".bin")):
            shutil.copy2(path, tmp / path.name)
    # clone: tied or fused tensors may share storage, which safetensors refuses to write
    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, str(tmp / "model.safetensors"),
              metadata={"format": "pt", "edgellm": json.dumps(record)})  # fmt: skip
    (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    replace_dir(tmp, target)


def write_quantized_stage(model_dir: Path, config: QuantConfig, record: dict[str, Any]) -> Path:
    """Quantize the whole model in `model_dir` (one stage: embedding, every layer, head) with `config`, and save
    it where `load_or_quantize` looks for it, marked as QAT's. Returns the file's path."""
    model_config = load_config(model_dir)
    layers = int(model_config.num_hidden_layers)
    spec = StageSpec(0, layers, embed=True, head=True)
    with SafetensorsSource(model_dir) as source:
        stage = build_stage(model_config, spec, source)
    quantize_module(stage, config)
    path = cache_path(model_dir, spec, config)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.qat")
    save_stage(stage, tmp, model_config, config)
    _mark(tmp, path, record)
    return path


def _mark(source: Path, target: Path, record: dict[str, Any]) -> None:
    """Copy the stage file `source` to `target` with `origin = qat` and the record added to its metadata."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        tensors = {key: f.get_tensor(key).clone() for key in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    metadata.update({"origin": ORIGIN, "qat": json.dumps(record)})
    save_file(tensors, str(source), metadata=metadata)
    os.replace(source, target)
