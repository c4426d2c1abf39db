"""Quantization schemes: the registry of valid names, and which modules of a stage a scheme applies to.

A scheme name is `KIND` or `KIND-gGROUP`: `int8` (one scale per output channel), `int8-g64`, `int4-g32`,
`nf4-g64`, ... Every group runs along the input dimension K of a weight `[N, K]` and must divide it. Plain names
round each group over its full range; a name may end with a scale search, `-mse` or `-gptq` (`int4-g64-gptq`):
the same grid, codes, storage and kernels, with scales chosen to minimise an error (`SEARCHES`).
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Literal

from edgellm.errors import ConfigError

Kind = Literal["int8", "int4", "nf4"]
NO_QUANT = "none"
# What bits hold one weight, before scales: a first approximation of a scheme's size.
BITS: dict[str, int] = {"int8": 8, "int4": 4, "nf4": 4}
# Scale searches a scheme name may end with (`edgellm.quant.search`): same storage, kernels and bytes.
SEARCHES: dict[str, str] = {
    "mse": "per group, the bf16 scale (and int4 zero) minimising the weight's squared error, from 11 candidate "
    "grids each refit by least squares; plain rounding is one of the candidates, so it is never worse",
    "gptq": "GPTQ on each linear layer's inputs over the shipped calibration text (edgellm.quant.calibration), "
    "each group's grid from the search; embeddings get the mse search (no calibration needed)",
}
CALIBRATED = frozenset({"gptq"})  # searches that need each layer's input statistics


@dataclass(frozen=True)
class Scheme:
    """One weight-only quantization scheme.

    Attributes:
        name: the registry key, e.g. "int4-g64".
        kind: "int8" (symmetric, absmax), "int4" (asymmetric, min/max) or "nf4" (QLoRA's normal-float grid).
        group_size: weights per scale along K; None for one scale per output channel (int8 only).
        search: how the scales are chosen: None for plain rounding over each group's full range, or a key of
            `SEARCHES` (the same codes, scales and zeros, chosen to minimise an error; see `edgellm.quant.search`).
    """

    name: str
    kind: Kind
    group_size: int | None
    search: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in BITS:
            raise ConfigError(f"unknown quantization kind {self.kind!r}; choose from {sorted(BITS)}")
        if self.group_size is None and self.kind != "int8":
            raise ConfigError(f"{self.kind} needs a group size")
        if self.group_size is not None and (self.group_size < 2 or self.group_size % 2):
            raise ConfigError(f"group size must be an even number >= 2, got {self.group_size}")
        if self.search is not None and self.search not in SEARCHES:
            raise ConfigError(f"unknown scale search {self.search!r}; choose from {sorted(SEARCHES)}")

    @property
    def base(self) -> str:
        """The name of the plain-rounding scheme with the same grid ("int4-g64" for "int4-g64-mse")."""
        return self.name.removesuffix(f"-{self.search}") if self.search else self.name

    def groups(self, in_features: int) -> int:
        """Scale groups per output row of a weight with `in_features` columns.

        Raises:
            ConfigError: the group size does not divide `in_features` (or, for 4-bit, K is odd).
        """
        if self.group_size is None:
            return 1
        if in_features % self.group_size:
            raise ConfigError(
                f"scheme {self.name}: group size {self.group_size} does not divide the input dimension "
                f"{in_features}; choose a group size that divides it"
            )
        return in_features // self.group_size


SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme("int8", "int8", None),
        Scheme("int8-g32", "int8", 32),
        Scheme("int8-g64", "int8", 64),
        Scheme("int8-g128", "int8", 128),
        Scheme("int4-g32", "int4", 32),
        Scheme("int4-g64", "int4", 64),
        Scheme("int4-g128", "int4", 128),
        Scheme("nf4-g32", "nf4", 32),
        Scheme("nf4-g64", "nf4", 64),
    )
}

# The same grids with a scale search: `int4-g64-mse`, ... Kept apart from SCHEMES (the plain grids the CLI lists).
SEARCHED_SCHEMES: dict[str, Scheme] = {
    f"{s.name}-{search}": Scheme(f"{s.name}-{search}", s.kind, s.group_size, search)
    for s in SCHEMES.values()
    for search in SEARCHES
}

# Short names: QLoRA's NF4 uses blocks of 64; our int4 is most accurate with groups of 32 (docs/QUANTIZATION.md).
ALIASES = {"nf4": "nf4-g64", "int4": "int4-g32"}


def get_scheme(name: str) -> Scheme:
    """The registered scheme called `name`.

    Raises:
        ConfigError: unknown name (the message lists the valid ones).
    """
    found = SCHEMES.get(name) or SEARCHED_SCHEMES.get(name)
    if found is None:
        raise ConfigError(
            f"unknown quantization scheme {name!r}; choose from {[NO_QUANT, *SCHEMES]} (or the short names {ALIASES}), "
            f"each optionally with a scale search suffix {[f'-{s}' for s in SEARCHES]}"
        )
    return found


# Stage part names (see `edgellm.model.stage.Stage`) that a rule may use as shorthands.
PART_PATTERNS: dict[str, tuple[str, ...]] = {
    "embed": ("embed",),
    "head": ("head",),
    "attn": ("blocks.*.self_attn.*", "blocks.*.attn.*"),
    "mlp": ("blocks.*.mlp.*",),
}
# Learned position embeddings are tiny and position-sensitive: never worth quantizing.
ALWAYS_FLOAT: tuple[str, ...] = ("pos_embed",)


@dataclass(frozen=True)
class QuantConfig:
    """A scheme for a stage's linear layers and embeddings, with per-module exceptions.

    Attributes:
        scheme: a key of `SCHEMES`: what every module gets unless a rule says otherwise.
        rules: (pattern, scheme or "none") pairs, first match wins. A pattern is a shorthand of `PART_PATTERNS`
            ("head", "embed", "attn", "mlp") or an `fnmatch` pattern over the stage's module names
            ("blocks.0.*", "*.down_proj"); "none" keeps the module in floating point.

    Raises:
        ConfigError: an unknown scheme, or an empty pattern.
    """

    scheme: str
    rules: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        get_scheme(self.scheme)
        for pattern, scheme in self.rules:
            if not pattern.strip():
                raise ConfigError("a quantization rule needs a module pattern before '='")
            if scheme != NO_QUANT:
                get_scheme(scheme)

    @property
    def spec(self) -> Scheme:
        return get_scheme(self.scheme)

    @property
    def text(self) -> str:
        """The config in the syntax `parse_quant` reads, e.g. "int4-g32,head=int8"."""
        return ",".join([self.scheme, *(f"{p}={s}" for p, s in self.rules)])

    def scheme_for(self, name: str) -> Scheme | None:
        """The scheme of the module called `name` (relative to the stage), or None to keep it in floating point."""
        if any(fnmatchcase(name, p) for p in ALWAYS_FLOAT):
            return None
        for pattern, scheme in self.rules:
            if any(fnmatchcase(name, p) for p in PART_PATTERNS.get(pattern, (pattern,))):
                return None if scheme == NO_QUANT else get_scheme(scheme)
        return self.spec


def needs_calibration(config: QuantConfig) -> bool:
    """True when a scheme of `config` (or of one of its rules) needs calibration statistics."""
    names = [config.scheme, *(s for _, s in config.rules if s != NO_QUANT)]
    return any(get_scheme(name).search in CALIBRATED for name in names)


def parse_quant(text: str | None) -> QuantConfig | None:
    """`"int4-g32,head=int8,embed=none"` -> `QuantConfig`; None, "" or "none" -> None (floating point).

    Raises:
        ConfigError: unknown scheme, or a malformed rule (the message shows the syntax).
    """
    if text is None or not text.strip() or text.strip() == NO_QUANT:
        return None
    first, *rest = [part.strip() for part in text.split(",")]
    first = ALIASES.get(first, first)
    rules = []
    for rule in rest:
        pattern, eq, scheme = rule.partition("=")
        if not eq or not pattern.strip() or not scheme.strip():
            raise ConfigError(
                f"cannot parse quantization rule {rule!r} in {text!r}; write SCHEME[,PATTERN=SCHEME|none...], "
                "e.g. int4-g32,head=int8,embed=none"
            )
        rules.append((pattern.strip(), ALIASES.get(scheme.strip(), scheme.strip())))
    return QuantConfig(first, tuple(rules))


def weight_bytes(out_features: int, in_features: int, scheme: str | None, embedding: bool = False) -> int:
    """Exact in-memory bytes of one weight `[N, K]` under `scheme` (None: float32), codes plus scales.

    Pure arithmetic (no torch), to size a stage without building it. An int4 linear layer counts the padding of
    N to a multiple of 16 that its kernel needs; an embedding table `[V, D]` (`embedding=True`) is not padded.

    Raises:
        ConfigError: unknown scheme, or a group size that does not divide `in_features`.
    """
    if scheme is None or scheme == NO_QUANT:
        return 4 * out_features * in_features
    spec = get_scheme(scheme)
    groups = spec.groups(in_features)
    if spec.kind == "int8":
        return out_features * in_features + 2 * out_features * groups
    if spec.kind == "int4":
        padded = out_features if embedding else -(-out_features // 16) * 16
        return padded * in_features // 2 + 4 * padded * groups  # codes + bf16 (scale, zero) pairs
    return out_features * in_features // 2 + 2 * out_features * groups  # nf4: codes + bf16 absmax
