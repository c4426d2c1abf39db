"""Every assumption behind a `CalcReport`, in words, so that a report can be checked line by line."""

from __future__ import annotations

from edgellm.calc.config import ALL_LINEAR, OPTIMIZER_STATES
from edgellm.calc.memory import LOGIT_BITS, CalcReport, lora_params_per_layer

# Assumptions that depend on the model itself, not on the method: a comparison of models prints them per model.
MODEL_TOPICS = ("sizes", "parameters")


def _bytes_text(bits: float) -> str:
    return f"{bits / 8:g} B"


def assumptions(report: CalcReport, source: str) -> list[tuple[str, str]]:
    """(topic, sentence) pairs: where the sizes come from, how each component is counted, what is left out.

    `source` says where the model's sizes came from (a preset's citation, or a config.json's path).
    """
    shape, c = report.model, report.config
    dims, p = shape.dims, c.precision
    head = "the LM head shares the embedding's matrix" if shape.tied else "an untied LM head"
    rows = [
        ("sizes", source),
        (
            "parameters",
            f"counted from the sizes: {dims.num_layers} layers x {shape.layer.params:,} + embedding "
            f"{shape.embed_params:,} + final norm {shape.final_norm_params:,}"
            + ("" if shape.tied else f" + LM head {shape.lm_head_params:,}")
            + f" ({head}); the layer's linear modules: "
            + ", ".join(f"{lin.name} [{lin.out_features}x{lin.in_features}]" for lin in shape.layer.linears),
        ),
        (
            "weights",
            f"the layers' linear weights at {p.weights.name} ({p.weights.bits:.4g} bits: {p.weights.source}); "
            f"embeddings, LM head, norms and biases at {p.float_bits:g} bits"
            + (f"; LoRA's A and B at {p.adapter_bits} bits" if c.lora is not None else ""),
        ),
        ("method", _method_text(report)),
        ("activations", _activation_text(report)),
        ("kv cache", _kv_text(report)),
        ("split", _split_text(report)),
        (
            "not counted",
            "the framework's and the accelerator's own memory, allocator fragmentation, temporary buffers (a "
            "dequantized weight, attention workspace, the gradient of the activation being propagated) and the data",
        ),
        ("units", "GB = 10^9 bytes (a '24 GB' GPU has 24 GiB = 25.77 GB); MB = 10^6 bytes"),
    ]
    return rows


def _method_text(report: CalcReport) -> str:
    c, p = report.config, report.config.precision
    states = OPTIMIZER_STATES[p.optimizer]
    if c.method.trains == "none":
        return "inference: nothing trains, so no gradients, optimizer states or activations kept for a backward pass"
    trainable_bits = p.float_bits if c.method.trains == "all" else p.adapter_bits
    grad_bits = p.grad_bits if p.grad_bits is not None else trainable_bits
    master = 32 if p.master_weights and trainable_bits < 32 else 0
    optimizer = f"{p.optimizer}: {states} state(s) x {p.optimizer_bits} bits" + (
        " + fp32 master copy" if master else ""
    )
    total_bits = trainable_bits + grad_bits + states * p.optimizer_bits + master
    per_param = (
        f"{_bytes_text(trainable_bits)} weight + {_bytes_text(grad_bits)} gradient + "
        f"{_bytes_text(states * p.optimizer_bits + master)} optimizer ({optimizer}) = {_bytes_text(total_bits)} per "
        "trainable parameter"
    )
    if not master:
        per_param += (
            "; no fp32 master copy of the weights (--master-weights adds 4 B: the 16 B of mixed-precision Adam, "
            "Rajbhandari et al. 2020, ZeRO)"
        )
    if c.method.trains == "all":
        return f"full fine-tuning, every parameter trains: {per_param}"
    assert c.lora is not None
    targets = c.lora.targets or ("the architecture's default",)
    modules = ", ".join(lin.name for lin in report.adapted)
    per_layer = lora_params_per_layer(report.adapted, c.lora.rank)
    text = (
        f"{c.method.name} ({c.method.source}): rank {c.lora.rank} on {', '.join(targets)} = {modules} in each of "
        f"{report.model.dims.num_layers} layers, r x (in + out) per module = {per_layer:,} per layer; the base is "
        f"frozen (no gradients or optimizer states); the adapters: {per_param}"
    )
    if c.lora.targets == (ALL_LINEAR,):
        text += f"; {ALL_LINEAR} is every linear module of the layers (not the LM head, as peft)"
    if c.method.name == "qlora":
        text += "; the paged optimizer moves its states to CPU memory only under pressure: counted here in full"
    return text


def _activation_text(report: CalcReport) -> str:
    c, shape = report.config, report.model
    if c.method.trains == "none":
        return "none kept: a forward pass's transient buffers are not counted"
    w = c.workload
    per_layer = shape.layer.act_elements_per_token
    lora = len(report.adapted) * c.lora.rank if c.lora is not None else 0
    text = (
        f"{w.batch} x {w.seq_len} tokens per step; per token and layer {per_layer:,} elements"
        + (f" + {lora:,} for LoRA (r per adapted module)" if lora else "")
        + f" at {c.precision.act_bits} bits: the norm, attention and MLP inputs, q, k, v and the MLP's inner "
        "tensors that autograd keeps (Korthikanti et al. 2022, §4.1, without dropout masks and without the "
        "[S, S] attention scores: memory-efficient attention)"
    )
    if c.method.trains == "adapters":
        text += ", the same set as full fine-tuning"
    if w.checkpointing:
        text += (
            f"; activation checkpointing: each layer keeps its input ({shape.dims.hidden_size:,} elements), plus "
            "one layer's full set while it is recomputed"
        )
    return text + (
        f"; the head keeps the final norm's and the LM head's inputs and a {LOGIT_BITS}-bit log-softmax over "
        f"{shape.dims.vocab_size:,} tokens"
    )


def _kv_text(report: CalcReport) -> str:
    c, dims = report.config, report.model.dims
    if c.method.trains != "none":
        return "none: a training step runs each sequence in one pass, with no cache"
    return (
        f"{c.workload.batch} x {c.workload.seq_len} tokens, K and V of {dims.num_kv_heads} heads x {dims.head_dim} "
        f"per layer at {c.precision.kv_bits} bits (a sliding window is not taken into account)"
    )


def _split_text(report: CalcReport) -> str:
    s = report.config.split
    if not s.cuts:
        return f"no split: one node ({s.node_names[0]}) holds the whole model"
    return (
        f"cuts {','.join(map(str, s.cuts))} as edgellm's --cuts (model.stage.chain_stages): the device runs the "
        "embedding and the layers before the first cut, each next node from its cut to the next (a first cut of 0 "
        f"leaves the device no layer); the head on the {s.head}"
        + (
            "; a node with the head but not the embedding holds its own copy of the tied matrix"
            if report.model.tied
            else ""
        )
    )
