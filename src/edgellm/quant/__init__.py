"""Weight-only post-training quantization: pure tensor functions, drop-in modules, a walker, and stage files.

    qw = quantize(weight, "int4-g64")             # pure: QuantizedWeight (codes + bf16 scales)
    qw = quantize(weight, "int4-g64-mse")         # the same grid, error-minimising scales (quant/search.py)
    qw = gptq_quantize(weight, "int4-g64", h)     # GPTQ with the inputs' E[x x^T] (quant/gptq.py, calibration.py)
    quantize_module(stage, QuantConfig("int8"))   # in place: nn.Linear -> Int8Linear, ...
    save_stage(stage, path, model_config, config) / load_stage(path, model_config, spec)

See docs/QUANTIZATION.md for the schemes, their accuracy, size and speed.
"""

from edgellm.quant.modules import Int4Linear, Int8Linear, NF4Linear, QuantEmbedding
from edgellm.quant.scheme import SCHEMES, QuantConfig, Scheme, get_scheme, parse_quant, weight_bytes
from edgellm.quant.tensor import QuantizedWeight, dequantize, quantize
from edgellm.quant.walker import quantize_module

__all__ = [
    "SCHEMES",
    "Int4Linear",
    "Int8Linear",
    "NF4Linear",
    "QuantConfig",
    "QuantEmbedding",
    "QuantizedWeight",
    "Scheme",
    "dequantize",
    "get_scheme",
    "parse_quant",
    "quantize",
    "quantize_module",
    "weight_bytes",
]
