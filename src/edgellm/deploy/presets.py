"""Named node presets: what a phone, a laptop, an edge server and a cloud server are, for the emulation.

Pure data. A topology node says `preset = "phone"`; the keys it gives itself (`compute_scale`, `memory_mb`,
`threads`) override the preset's. Every number carries its source (`NodePreset.source`, and the table in
docs/TOPOLOGY.md). Two things to keep in mind when reading them:

- `compute_scale` is relative to **the machine running the emulation**: an `edge-server` node runs at this
  machine's own speed (1.0), a `phone` node four times slower than that, whatever this machine is.
- `memory_mb` is **scaled to this project's default model**, SmolLM2-135M (538 MB of float32 weights), not
  copied from a real phone: a node process's runtime alone (Python, torch, transformers, gRPC) is about 320 MB
  here, where a native app runtime is a few MB. What is kept is the outcome: as a 7B model in fp16 (14 GB) does
  not fit in the 3-4 GB a phone app may use while its int4 copy (~4 GB) just does, the whole 135M model in fp32
  does not fit in the phone's budget while its int8 or int4 copy does.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgellm.errors import ConfigError


@dataclass(frozen=True)
class NodePreset:
    """A bundle of node capabilities.

    Attributes:
        compute_scale: the node's stage computations take this many times what they take on this machine.
        memory_mb: the node process's whole memory budget, MB (10^6 bytes); None for no limit.
        threads: torch threads of the node's stages.
        source: where each number comes from.
    """

    compute_scale: float
    memory_mb: int | None
    threads: int
    source: str


PRESETS: dict[str, NodePreset] = {
    "phone": NodePreset(
        compute_scale=4.0,
        memory_mb=1100,
        threads=1,
        source=(
            "compute_scale 4: LLM decode is memory-bandwidth bound; a flagship phone CPU decodes a 3B Q4_K_M model "
            "(1.7 GB) at 11.2 tok/s (Pixel 8 Pro, Tensor G3; 8-12 tok/s on a Snapdragon 8 Gen 2: "
            "mvpfactory.io, 'Running LLMs on-device in Android'), about 19 GB/s of weights, where a desktop CPU "
            "decodes a 7B Q4_0 model (3.8 GB) at 18.3 tok/s (i9-13900K, DDR5-6400, 8 threads: llama.cpp issue "
            "#34), about 69 GB/s: 3.6x, rounded to 4. memory_mb 1100: an app may use about half a phone's RAM "
            "(3.3 GB on a 12 GB iPhone without the increased-memory-limit entitlement, ~6 GB with it: Apple's "
            "os_proc_available_memory and com.apple.developer.kernel.increased-memory-limit docs and developer "
            "reports; ~4 GB of 8 GB on a Snapdragon 8 Gen 3 phone); scaled to SmolLM2-135M so that, as a 7B fp16 "
            "model does not fit in that share and its int4 copy does, the whole model in fp32 does not fit "
            "(1188-1301 MB predicted at max_context 2048, refused before loading) while int8 (813 predicted, 911 "
            "measured) and int4 (751, 895) do, as does the fp32 device part of examples/local-3node.toml (layers "
            "0-9, embedding and head: 951 MB measured). threads 1: one core of this machine, slowed 4x"
        ),
    ),
    "laptop": NodePreset(
        compute_scale=2.0,
        memory_mb=4000,
        threads=1,
        source=(
            "compute_scale 2: between an x86 laptop CPU, which decodes only ~1.2x as fast as a flagship phone "
            "CPU (i7-10750H 17.8 vs Dimensity 9000+ 15.1 tok/s, llama.cpp Q4_0 tg256: pt13762104.github.io), i.e. "
            "~3.4 against a desktop/server CPU, and an Apple M-series laptop whose 100 GB/s unified memory decodes "
            "as fast as a desktop (~1); memory_mb 4000: a few GB of a 16 GB laptop left to one process, enough for "
            "the whole model in fp32 with several sessions; threads 1 (see edge-server)"
        ),
    ),
    "edge-server": NodePreset(
        compute_scale=1.0,
        memory_mb=None,
        threads=1,
        source=(
            "compute_scale 1.0: this machine's own cores, unscaled (the emulation's reference); no memory budget: "
            "an edge server holds a few stages of a 135M model with room to spare; threads 1: every node of an "
            "emulation shares this machine's cores, and a decode step of this model's 576-wide layers is no "
            "faster on 2 threads than on 1 (docs/PLANNER.md)"
        ),
    ),
    "cloud": NodePreset(
        compute_scale=1.0,
        memory_mb=None,
        threads=1,
        source=(
            "compute_scale 1.0: this machine's own cores; a cloud server is faster than this machine, but the "
            "emulation does not speed anything up (no GPU is emulated); no memory budget; threads 1 (see "
            "edge-server)"
        ),
    ),
}


def get_preset(name: str) -> NodePreset:
    """The preset called `name`. Raises ConfigError naming the valid ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}") from None
