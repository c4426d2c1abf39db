"""Synthetic LoRA adapters: random A and B of a given rank on a model's projections, saved in peft's format.

For benchmarks and examples of serving and caching many fine-tunes of one base, where what matters is an
adapter's layout and size and that each changes the model's tokens, not what it learnt. A real fine-tune
(`edgellm finetune`, or any peft adapter) is used the same way. Deterministic in `seed`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from edgellm.errors import ConfigError
from edgellm.lora.config import LoraSpec
from edgellm.lora.peft_io import save_peft_adapter
from edgellm.store.weights import SafetensorsSource

SYNTHETIC_TARGETS = ("q_proj", "v_proj")


def synthetic_adapter(
    model_dir: Path, directory: Path, seed: int, rank: int = 8, targets: tuple[str, ...] = SYNTHETIC_TARGETS
) -> int:
    """Write a random rank-`rank` adapter of the model in `model_dir` on modules named `targets` to `directory`;
    -> its bytes (float32 tensors). B has entries of about 0.1 x sqrt(8 / r) (x alpha / r = 2), so
    the update's size does not grow with the rank: enough to change
    a greedy answer of SmolLM2-135M within a dozen tokens and keep it fluent.

    Raises:
        ConfigError: the model has no linear weight named by `targets`.
    """
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    with SafetensorsSource(model_dir) as source:
        for name in source.names():
            module, _, leaf = name.rpartition(".")
            if leaf != "weight" or module.rsplit(".", 1)[-1] not in targets:
                continue
            out_features, in_features = source(name).shape
            tensors[f"{module}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) / in_features**0.5
            tensors[f"{module}.lora_B.weight"] = (
                torch.randn(out_features, rank, generator=generator) * 0.1 * (8 / rank) ** 0.5
            )
    if not tensors:
        raise ConfigError(f"{model_dir}: no linear weights named {list(targets)} to adapt")
    spec = LoraSpec(r=rank, alpha=float(2 * rank), target_modules=targets)
    save_peft_adapter(directory, spec, tensors, base_model=str(model_dir))
    return sum(t.numel() * 4 for t in tensors.values())
