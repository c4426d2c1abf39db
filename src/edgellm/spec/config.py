"""What speculative decoding runs with: how many drafts per round, and which drafter (`--speculative`, `--draft`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgellm.errors import ConfigError
from edgellm.model.stage import StageSpec
from edgellm.spec.drafter import DraftModel

log = logging.getLogger(__name__)

K_MAX = 8  # most drafts per round: past this a chat drafter's acceptance makes more drafts a waste
DEFAULT_DRAFT = "int4-g32"  # the target model itself at 4 bits (about 4 bits per weight; embedding and head too)
DRAFT_KINDS = ("SCHEME (the target model quantized, e.g. int4-g32)", "exit:FILE", "model:NAME|DIR")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding settings.

    Attributes:
        k: drafts per round; None: chosen each round by the cost model (`edgellm.spec.cost`).
        k_max: the most drafts per round with `k` None.
        draft: the drafter (`parse_draft`).
    """

    k: int | None = None
    k_max: int = K_MAX
    draft: str = DEFAULT_DRAFT

    def __post_init__(self) -> None:
        if self.k is not None and not 0 <= self.k <= 32:
            raise ConfigError(f"--speculative K must be in 0..32 (or auto), got {self.k}")
        if not 1 <= self.k_max <= 32:
            raise ConfigError(f"the most drafts per round must be in 1..32, got {self.k_max}")
        parse_draft(self.draft)

    @classmethod
    def parse(cls, speculative: str, draft: str = DEFAULT_DRAFT) -> SpeculativeConfig:
        """`"auto"` or a number of drafts per round (`--speculative`), with a drafter (`--draft`)."""
        text = speculative.strip().lower()
        if text == "auto":
            return cls(None, K_MAX, draft)
        try:
            k = int(text)
        except ValueError:
            raise ConfigError(
                f"--speculative must be 'auto' or a number of drafts per round, got {speculative!r}"
            ) from None
        return cls(k, max(k, 1), draft)

    def to_json(self) -> dict[str, Any]:
        return {"speculative": "auto" if self.k is None else str(self.k), "draft": self.draft}


def parse_draft(text: str) -> tuple[str, str]:
    """`"int4-g32"` -> ("quant", "int4-g32"); `"exit:F"` -> ("exit", F); `"model:M"` -> ("model", M).

    Raises:
        ConfigError: an empty value, or an unknown quantization scheme (the message lists the forms).
    """
    from edgellm.quant.scheme import parse_quant

    kind, sep, value = text.partition(":")
    if sep and kind in ("exit", "model"):
        if not value:
            raise ConfigError(f"--draft {text!r} names no {'file' if kind == 'exit' else 'model'}")
        return kind, value
    try:
        parse_quant(text)
    except ConfigError as exc:
        raise ConfigError(f"--draft {text!r} is not one of {list(DRAFT_KINDS)}: {exc}") from None
    return "quant", text


def load_draft(
    draft: str, model_dir: Path, dtype: torch.dtype = torch.float32, engine: str = "fast", compute_scale: float = 1.0
) -> DraftModel:
    """Build the drafter `draft` for the target model in `model_dir`.

    Raises:
        ConfigError: a drafter whose vocabulary differs from the target's, or an exit head of another model.
        ModelError: a model or file that cannot be found.
    """
    from edgellm.split.one_process import load_stages
    from edgellm.store.resolve import resolve_model
    from edgellm.store.weights import load_config

    kind, value = parse_draft(draft)
    if kind == "exit":
        from edgellm.spec.exit_head import load_exit_draft

        net: Any = load_exit_draft(model_dir, Path(value).expanduser(), dtype, engine)
        label = net.describe()
    else:
        from edgellm.quant.scheme import parse_quant

        source = model_dir if kind == "quant" else resolve_model(value)
        if kind == "model":
            check_same_vocabulary(model_dir, source)
        layers = int(load_config(source).num_hidden_layers)
        quant = parse_quant(value) if kind == "quant" else None
        net = load_stages(source, [StageSpec(0, layers, embed=True, head=True)], dtype, quant, engine)[0]
        label = value if kind == "quant" else f"model {value}"
    weight_bytes = sum(t.numel() * t.element_size() for t in [*net.parameters(), *net.buffers()])
    log.info("drafter: %s, %.1f MB", label, weight_bytes / 1e6)
    return DraftModel(net, label, compute_scale, weight_bytes)


def check_same_vocabulary(target_dir: Path, draft_dir: Path) -> None:
    """Refuse a draft model whose tokens mean something else than the target's.

    Raises:
        ConfigError: the vocabularies differ (size, or any token's id).
    """
    from edgellm.store.weights import load_tokenizer

    target, draft = load_tokenizer(target_dir), load_tokenizer(draft_dir)
    if len(target) != len(draft) or target.get_vocab() != draft.get_vocab():
        raise ConfigError(
            f"draft model {draft_dir} has another vocabulary than the target {target_dir} "
            f"({len(draft)} against {len(target)} tokens): speculative decoding needs the same tokenizer"
        )
