"""LoRA for split stages: adapters injected by composition, switched per call, averaged, saved in peft's format.

    spec = LoraSpec(r=8, alpha=16, target_modules=("q_proj", "v_proj"))
    inject_lora(stage, arch_for(config).layers, spec, "client0")   # wraps the stage's blocks' linears
    with use_adapter(stage, "client0"): logits = stage(ids, positions)
    state = adapter_state(stage, "client0")  # {"model.layers.3.self_attn.q_proj.lora_A.weight": tensor, ...}
    save_peft_adapter(path, spec, state, base_model="HuggingFaceTB/SmolLM2-135M")  # peft.PeftModel loads it

A quantized base (edgellm's Int8/Int4/NF4 linears) makes it QLoRA: `LoRALinear(base=Int4Linear(...))`.
"""

from edgellm.lora.config import ALL_LINEAR, LoraSpec
from edgellm.lora.fedavg import fedavg
from edgellm.lora.inject import (
    adapter_grads,
    adapter_parameters,
    adapter_state,
    inject_lora,
    load_adapter_state,
    set_active,
    stage_keys,
    use_adapter,
)
from edgellm.lora.linear import LoRALinear
from edgellm.lora.peft_io import load_peft_adapter, save_peft_adapter

__all__ = [
    "ALL_LINEAR",
    "LoRALinear",
    "LoraSpec",
    "adapter_grads",
    "adapter_parameters",
    "adapter_state",
    "fedavg",
    "inject_lora",
    "load_adapter_state",
    "load_peft_adapter",
    "save_peft_adapter",
    "set_active",
    "stage_keys",
    "use_adapter",
]
