"""What `edgellm calc` is asked: a method, LoRA's rank and modules, bit-widths, a workload and a split.

Each part is a frozen dataclass validated on construction; `Method` holds the defaults each method implies, with
their source, so that a report can say where every number came from.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgellm.errors import ConfigError

HEADS = ("device", "server")  # mirrors edgellm.model.stage.HEAD_PLACEMENTS (tests/test_calc.py checks)
ALL_LINEAR = "all-linear"  # as edgellm.lora.config.ALL_LINEAR: every linear module of the decoder layers
OPTIMIZER_STATES = {"adam": 2, "momentum": 1, "sgd": 0}  # states kept per trainable parameter (Adam: m and v)


@dataclass(frozen=True)
class WeightFormat:
    """How the decoder layers' linear weights are stored: `bits` per weight, scale overhead included."""

    name: str
    bits: float
    is_float: bool
    source: str


FORMATS: dict[str, WeightFormat] = {
    f.name: f
    for f in (
        WeightFormat("fp32", 32, True, "IEEE 754 binary32"),
        WeightFormat("bf16", 16, True, "bfloat16"),
        WeightFormat("fp16", 16, True, "IEEE 754 binary16"),
        WeightFormat("int8", 8, False, "8-bit codes (per-row scales not counted)"),
        WeightFormat("int4", 4, False, "4-bit codes (group scales not counted)"),
        WeightFormat(
            "nf4",
            4 + 32 / 64,
            False,
            "QLoRA's NormalFloat4 in blocks of 64 with an fp32 absmax each: 4 + 32/64 bits (Dettmers et al. 2023, §3)",
        ),
        WeightFormat(
            "nf4-dq",
            4 + 8 / 64 + 32 / (64 * 256),
            False,
            "NF4 with double quantization: an 8-bit absmax "
            "per block of 64, an fp32 constant per 256 blocks: 4 + 8/64 + 32/(64*256) bits "
            "(Dettmers et al. 2023, §3)",
        ),
    )
}


def parse_format(text: str) -> WeightFormat:
    """A name of `FORMATS`, or a number of bits per weight (16 and 32 are floating point, others integer codes).

    Raises:
        ConfigError: neither a known name nor a number of bits in (0, 32].
    """
    key = text.strip().lower()
    if key in FORMATS:
        return FORMATS[key]
    try:
        bits = float(key)
    except ValueError:
        raise ConfigError(f"unknown weight format {text!r}; choose from {list(FORMATS)} or a number of bits") from None
    if not 0 < bits <= 32:
        raise ConfigError(f"weight bits must lie in (0, 32], got {text!r}")
    return WeightFormat(f"{bits:g}-bit", bits, bits in (16, 32), "a number of bits per weight, as given")


@dataclass(frozen=True)
class Method:
    """A way to train (or serve) a model, with the defaults it implies.

    Attributes:
        name: the key users pass to `--method`.
        trains: "all" parameters, LoRA "adapters" on a frozen base, or "none" (inference: a KV cache instead).
        weights: the default format of the linear weights (`FORMATS`).
        lora_rank, lora_targets: LoRA's default rank and modules (None targets: the architecture's own default,
            `edgellm.calc.shape.DEFAULT_LORA_TARGETS`); None rank for methods without adapters.
        checkpointing: whether activation checkpointing is on by default.
        source: where these defaults come from.
    """

    name: str
    trains: str
    weights: str
    lora_rank: int | None
    lora_targets: tuple[str, ...] | None
    checkpointing: bool
    source: str


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("full", "all", "bf16", None, None, False, "every parameter trains"),
        Method(
            "lora",
            "adapters",
            "bf16",
            8,
            None,
            False,
            "Hu et al. 2021 (arXiv:2106.09685): rank 8 on W_q and W_v, the setting of its GPT-3 results",
        ),
        Method(
            "qlora",
            "adapters",
            "nf4-dq",
            64,
            (ALL_LINEAR,),
            True,
            "Dettmers et al. 2023 (arXiv:2305.14314): "
            "NF4 base with double quantization, bf16 adapters of rank 64 on every linear layer, gradient "
            "checkpointing, paged 32-bit AdamW",
        ),
        Method("inference", "none", "bf16", None, None, False, "serving: weights and a KV cache, nothing trains"),
    )
}


def get_method(name: str) -> Method:
    """The method called `name`.

    Raises:
        ConfigError: an unknown name (the message lists the valid ones).
    """
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose from {list(METHODS)}")
    return METHODS[name]


@dataclass(frozen=True)
class LoraSetup:
    """LoRA's rank and the modules it adapts (peft's `target_modules`: names matched as dotted suffixes), or
    `targets=None` for the architecture's default.

    Raises:
        ConfigError: rank < 1, or empty or malformed module names.
    """

    rank: int
    targets: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"LoRA rank must be an integer >= 1, got {self.rank!r}")
        if self.targets is not None:
            if not self.targets or not all(isinstance(t, str) and t.strip() == t and t for t in self.targets):
                raise ConfigError(f"LoRA target modules must be non-empty names, got {list(self.targets)}")
            if ALL_LINEAR in self.targets and len(self.targets) > 1:
                raise ConfigError(f"{ALL_LINEAR!r} must be the only LoRA target, got {list(self.targets)}")


def lora_setup(method: Method, rank: int | None, targets: tuple[str, ...] | None) -> LoraSetup | None:
    """The method's LoRA setup with `rank` and `targets` where given (None: the method's defaults).

    Raises:
        ConfigError: a rank or targets given to a method without adapters, or an invalid rank or target.
    """
    if method.trains != "adapters":
        if rank is not None or targets is not None:
            raise ConfigError(f"LoRA rank and target modules apply to lora and qlora, not to method {method.name!r}")
        return None
    default_rank = method.lora_rank if method.lora_rank is not None else 8
    return LoraSetup(rank if rank is not None else default_rank, targets or method.lora_targets)


def _check_bits(name: str, bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 64:
        raise ConfigError(f"{name} must be a whole number of bits in 1..64, got {bits!r}")


@dataclass(frozen=True)
class Precision:
    """Bit-widths. Embeddings, the LM head, norms and biases are held at the weights' bits when those are floating
    point, else at 16 bits (as bitsandbytes keeps them). `grad_bits=None`: the trainable weights' own bits.

    Raises:
        ConfigError: an unknown optimizer, or a bit-width outside 1..64.
    """

    weights: WeightFormat
    adapter_bits: int = 16
    grad_bits: int | None = None
    optimizer: str = "adam"
    optimizer_bits: int = 32
    master_weights: bool = False
    act_bits: int = 16
    kv_bits: int = 16

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZER_STATES:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; choose from {list(OPTIMIZER_STATES)}")
        for name in ("adapter_bits", "optimizer_bits", "act_bits", "kv_bits"):
            _check_bits(name.replace("_", "-"), getattr(self, name))
        if self.grad_bits is not None:
            _check_bits("grad-bits", self.grad_bits)

    @property
    def float_bits(self) -> float:
        """Bits of every parameter outside the decoder layers' linear weights (and of those, when float)."""
        return self.weights.bits if self.weights.is_float else 16


@dataclass(frozen=True)
class Workload:
    """A training step's (or a served batch's) tokens: `batch` sequences of `seq_len`.

    Raises:
        ConfigError: batch or seq_len below 1.
    """

    batch: int = 1
    seq_len: int = 512
    checkpointing: bool = False

    def __post_init__(self) -> None:
        for name, label in (("batch", "batch size"), ("seq_len", "sequence length")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{label} must be an integer >= 1, got {value!r}")

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len


@dataclass(frozen=True)
class Split:
    """Where the model is cut (`edgellm.model.stage.chain_stages`' convention): `cuts[i]` is the first layer of
    the (i+1)-th node; the first node is the device. `nodes=None` names them device, edge1, edge2, ...

    Raises:
        ConfigError: an unknown head placement; node names that are empty, repeated or not one per stage.
    """

    cuts: tuple[int, ...] = ()
    head: str = "device"
    nodes: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ConfigError(f"unknown head placement {self.head!r}; choose from {list(HEADS)}")
        names = self.node_names
        if len(names) != len(self.cuts) + 1:
            raise ConfigError(f"{len(names)} node name(s) for {len(self.cuts)} cut(s); need one more name than cuts")
        if not all(n.strip() for n in names) or len(set(names)) != len(names):
            raise ConfigError(f"node names must be non-empty and distinct, got {list(names)}")

    @property
    def node_names(self) -> tuple[str, ...]:
        if self.nodes is not None:
            return self.nodes
        return ("device", *(f"edge{i + 1}" for i in range(len(self.cuts))))


@dataclass(frozen=True)
class CalcConfig:
    """One calculation: a method with its LoRA setup (None for methods without adapters), bit-widths, workload
    and split.

    Raises:
        ConfigError: LoRA given to a method without adapters (or missing for one with them), or full fine-tuning
            of weights that are not floating point.
    """

    method: Method
    lora: LoraSetup | None
    precision: Precision
    workload: Workload
    split: Split

    def __post_init__(self) -> None:
        if (self.lora is not None) != (self.method.trains == "adapters"):
            raise ConfigError(f"method {self.method.name!r} {'needs' if self.lora is None else 'takes no'} LoRA setup")
        if self.method.trains == "all" and not self.precision.weights.is_float:
            raise ConfigError(
                f"full fine-tuning updates floating-point weights, not {self.precision.weights.name}; "
                "use --weights fp32, bf16 or fp16, or --method qlora for a quantized base"
            )


_SIZE_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str) -> int:
    """`"24GB"` -> 24e9 bytes, `"24GiB"` -> 24 x 2^30; a bare number is in GB.

    Raises:
        ConfigError: not a positive number with one of the units B, kB, MB, GB, TB, KiB, MiB, GiB, TiB.
    """
    raw = text.strip().lower().replace(" ", "")
    number = raw.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = raw[len(number) :] or "gb"
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in _SIZE_UNITS or not value > 0:
        raise ConfigError(f"cannot read the size {text!r}; write a positive number and a unit, e.g. 24GB or 24GiB")
    return int(value * _SIZE_UNITS[unit])


def parse_cuts(text: str | None) -> tuple[int, ...]:
    """`"10,20"` -> `(10, 20)`; None or "" -> `()`, as `edgellm.model.stage.parse_cuts` (which imports torch).

    Raises:
        ConfigError: a part is not an integer.
    """
    if text is None or not text.strip():
        return ()
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"--cuts must be comma-separated layer indices, got {text!r}") from None
