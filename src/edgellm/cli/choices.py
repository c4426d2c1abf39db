"""The names the CLI offers in its arguments and `--help`, spelled here so that building the parser imports no torch.

Each one mirrors a registry of the library that lives in a module importing torch (seconds on a small machine, for
every `edgellm --help`). tests/test_cli_light.py checks every mirror against its source, so they cannot drift.
"""

from __future__ import annotations

HEAD_PLACEMENTS = ("device", "server")  # edgellm.model.stage.HEAD_PLACEMENTS
ENGINES = ("fast", "generic")  # edgellm.engine.select.ENGINES
DTYPE_NAMES = ("bf16", "fp16", "fp32")  # sorted keys of edgellm.serve.local_engine.DTYPES
NO_QUANT = "none"  # edgellm.quant.scheme.NO_QUANT
QUANT_SCHEMES = (  # keys of edgellm.quant.scheme.SCHEMES, in its order
    "int8",
    "int8-g32",
    "int8-g64",
    "int8-g128",
    "int4-g32",
    "int4-g64",
    "int4-g128",
    "nf4-g32",
    "nf4-g64",
)
QUANT_PARTS = ("attn", "embed", "head", "mlp")  # sorted keys of edgellm.quant.scheme.PART_PATTERNS
CODECS = ("none", "fp16", "bf16", "int8", "int8mu")  # edgellm.net.codec.CODECS
LORA_TARGETS = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj"
)  # fmt: skip  # LoraSpec's default
SHARE_MODES = ("per-client", "shared")  # sorted keys of edgellm.splitlearn.settings.SHARE_MODES
DEMO_PROMPT = "Explain in two sentences why running a language model at the network edge reduces latency."
# ^ edgellm.deploy.demo_scenarios.DEFAULT_PROMPT
