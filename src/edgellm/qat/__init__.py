"""Quantization-aware training: fake-quantized weights with a straight-through estimator, drop-in modules, walkers
and the export to PTQ's stage files.

    w_hat = fake_quantize(w, "int4-g64")              # == dequantize(quantize(w)), gradient straight through
    apply_qat(stage, QuantConfig("int4-g64"), (4, 8))  # trainable linears -> FakeQuantLinear, the rest -> PTQ

See docs/TRAINING.md ("Quantization-aware training").
"""

from edgellm.qat.fake_quant import clip_range, fake_quantize, inside_clip_range, merge_lora
from edgellm.qat.modules import FakeQuantLinear
from edgellm.qat.walker import apply_qat, fake_quant_scope, train_parameters, unwrap_stage, wrap_stage

__all__ = [
    "FakeQuantLinear",
    "apply_qat",
    "clip_range",
    "fake_quant_scope",
    "fake_quantize",
    "inside_clip_range",
    "merge_lora",
    "train_parameters",
    "unwrap_stage",
    "wrap_stage",
]
