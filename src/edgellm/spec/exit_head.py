"""A trainable early exit for self-speculative drafting: layers [0, c) of the model plus a small adapted head.

`ExitHead` maps the hidden state after layer c to logits: a low-rank residual adapter `h + up(down(h))` (`up`
starts at zero, so an untrained head is exactly the model's own final norm + LM head), a trainable copy of the
final norm, then the model's LM head (frozen, shared). `ExitDraftNet` chains the embedding stage [0, c) with it
and is called as a full-model `Stage` is, which is all a drafter needs. The trained part (adapter and norm, well
under 1 MB) is saved alone to a safetensors file whose metadata names the model it was trained on.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgellm.errors import ConfigError
from edgellm.model.kv import KVCache
from edgellm.model.stage import Stage, StageSpec, last_real

log = logging.getLogger(__name__)

FORMAT = "edgellm-exit-head"
VERSION = "1"
_CHECKED_KEYS = ("model_type", "hidden_size", "vocab_size", "num_layers")


@dataclass(frozen=True)
class ExitMeta:
    """What an exit head file says about itself.

    Attributes:
        model: the model it was trained on: `name`, `model_type`, `hidden_size`, `vocab_size`, `num_layers`.
        layer: the exit layer c (the head reads the hidden state after layers [0, c)).
        rank: the adapter's rank.
        stats: how it was trained and how well it agrees with the full model (free-form, JSON-able).
    """

    model: dict[str, Any]
    layer: int
    rank: int
    stats: dict[str, Any] = field(default_factory=dict)


def model_identity(model_dir: Path, model_config: Any) -> dict[str, Any]:
    """The fields an exit head must agree with: the model's name (its registered name, else its directory's),
    architecture and sizes."""
    name = model_dir.name
    info = model_dir / "edgellm.json"
    if info.is_file():
        name = str(json.loads(info.read_text(encoding="utf-8")).get("name", name))
    return {
        "name": name,
        "model_type": str(model_config.model_type),
        "hidden_size": int(model_config.hidden_size),
        "vocab_size": int(model_config.vocab_size),
        "num_layers": int(model_config.num_hidden_layers),
    }


def check_layer(layer: int, num_layers: int) -> None:
    """Raises ConfigError unless `layer` is a valid exit layer (1..num_layers-1) of a model of `num_layers`."""
    if not 0 < layer < num_layers:
        raise ConfigError(f"exit layer {layer} is out of range: choose 1..{num_layers - 1} for {num_layers} layers")


class ExitHead(nn.Module):
    """Logits from the hidden state after layer c: low-rank residual adapter, final norm (a trainable copy), head.

    Args:
        head_stage: the model's head-only stage (`StageSpec(L, L, head=True)`): its norm is copied (and trained),
            its LM head is shared and frozen, and its logit softcap, if any, applied as the model does.
        rank: the adapter's rank (>= 1).
        seed: draws the adapter's initial `down` weights (as `nn.Linear` draws them; `up` starts at zero).

    Raises:
        ConfigError: a rank outside 1..hidden size, or a stage without a head.
    """

    def __init__(self, head_stage: Stage, rank: int, seed: int = 0) -> None:
        super().__init__()
        if head_stage.head is None or head_stage.norm is None:
            raise ConfigError(f"stage {head_stage.spec} holds no head to exit through")
        hidden = head_stage.dims.hidden_size
        if not 1 <= rank <= hidden:
            raise ConfigError(f"exit head rank must be in 1..{hidden} (the hidden size), got {rank}")
        dtype = head_stage.dtype
        self.rank = rank
        self.down = nn.Linear(hidden, rank, bias=False, dtype=dtype)
        self.up = nn.Linear(rank, hidden, bias=False, dtype=dtype)
        generator = torch.Generator().manual_seed(seed)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.up.weight)  # the untrained head is the model's own norm + head
        self.norm = copy.deepcopy(head_stage.norm).requires_grad_(True)
        self.head = head_stage.head.requires_grad_(False)
        self.softcap = head_stage.traits.logit_softcap

    def trainable(self) -> dict[str, torch.Tensor]:
        """The trained tensors by name (what a file holds): the adapter's and the norm's."""
        return {name: p for name, p in self.named_parameters() if not name.startswith("head.")}

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h: [B, S, D] hidden states after layer c -> float32 logits [B, S, V]."""
        h = h + self.up(self.down(h))
        logits = self.head(self.norm(h))
        if self.softcap is not None:  # as Stage.forward: in the head's dtype
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.float()


class ExitDraftNet(nn.Module):
    """The device's first layers [0, c) and an `ExitHead`, called as a full-model `Stage` (embedding + head).

    Args:
        stage: the embedding stage `StageSpec(0, c, embed=True)`.
        exit_head: the head reading its output.
    """

    def __init__(self, stage: Stage, exit_head: ExitHead) -> None:
        super().__init__()
        if stage.embed is None or stage.spec.start != 0 or stage.head is not None:
            raise ConfigError(f"an exit draft needs the embedding stage [0, c) without a head, got {stage.spec}")
        self.stage = stage
        self.exit_head = exit_head
        self.max_length = stage.max_length

    @property
    def layer(self) -> int:
        """The exit layer c."""
        return self.stage.spec.end

    @property
    def dtype(self) -> torch.dtype:
        return self.stage.dtype

    @property
    def label(self) -> str:
        """`exit@15 (rank 64)`."""
        return f"exit@{self.layer} (rank {self.exit_head.rank})"

    def describe(self) -> str:
        """What drafts: the label, for reports and logs."""
        return self.label

    def new_cache(self) -> KVCache:
        """An empty KV cache for one session of layers [0, c)."""
        return self.stage.new_cache()

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None = None,
        token_mask: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """As `Stage.forward` of a whole model.

        x: [B, S] int64 token ids, positions: [B, S] int64, token_mask: [B, S] bool (False = padding) or None
        -> float32 logits [B, S, V], or [B, 1, V] with `last_only` (each row's last real token)
        """
        h = self.stage(x, positions, cache, token_mask)  # [B, S, D]
        if last_only:
            h = last_real(h, token_mask)
        return self.exit_head(h)


def save_exit_head(exit_head: ExitHead, path: Path, meta: ExitMeta) -> None:
    """Write the trained tensors of `exit_head` (float32) and `meta` to `path`, atomically."""
    from safetensors.torch import save_file

    if meta.rank != exit_head.rank:
        raise ConfigError(f"metadata says rank {meta.rank}, the head has rank {exit_head.rank}")
    tensors = {name: t.detach().float().contiguous().clone() for name, t in exit_head.trainable().items()}
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "model": json.dumps(meta.model, sort_keys=True),
        "layer": str(meta.layer),
        "rank": str(meta.rank),
        "stats": json.dumps(meta.stats, sort_keys=True),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def read_exit_meta(path: Path) -> ExitMeta:
    """The metadata of an exit head file.

    Raises:
        ConfigError: the file is missing, is not an exit head file, or has another format version.
    """
    from safetensors import safe_open

    if not path.is_file():
        raise ConfigError(f"exit head file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own untyped errors on a bad file
        raise ConfigError(f"{path} is not a safetensors file: {exc}") from exc
    if metadata.get("format") != FORMAT:
        raise ConfigError(f"{path} is not an edgellm exit head file (format {metadata.get('format')!r})")
    if metadata.get("version") != VERSION:
        raise ConfigError(
            f"{path} has exit head format version {metadata.get('version')}; this edgellm reads {VERSION}"
        )
    return ExitMeta(
        json.loads(metadata["model"]), int(metadata["layer"]), int(metadata["rank"]), json.loads(metadata["stats"])
    )


def check_meta(meta: ExitMeta, model: dict[str, Any], path: Path) -> None:
    """Raises ConfigError when the file's model differs from `model` in architecture, sizes or depth, or its
    layer does not fit; a different name alone is only logged (a fine-tuned copy has the same shapes)."""
    wrong = [f"{key} {meta.model.get(key)} (model has {model[key]})" for key in _CHECKED_KEYS
             if meta.model.get(key) != model[key]]  # fmt: skip
    if wrong:
        raise ConfigError(f"exit head {path} was trained on another model: {', '.join(wrong)}")
    check_layer(meta.layer, model["num_layers"])
    if meta.model.get("name") != model["name"]:
        log.warning("exit head %s was trained on %s, loading it for %s", path, meta.model.get("name"), model["name"])


def load_exit_head(path: Path, head_stage: Stage, model: dict[str, Any]) -> tuple[ExitHead, ExitMeta]:
    """Read an exit head saved by `save_exit_head` onto the model's head stage; `model` is `model_identity(...)`.

    Raises:
        ConfigError: not an exit head file, trained on a model of other sizes or depth, or tensors missing.
    """
    from safetensors.torch import load_file

    meta = read_exit_meta(path)
    check_meta(meta, model, path)
    exit_head = ExitHead(head_stage, meta.rank)
    tensors = load_file(str(path))
    want = exit_head.trainable()
    if set(tensors) != set(want):
        raise ConfigError(f"exit head {path} holds tensors {sorted(tensors)}, expected {sorted(want)}")
    for name, param in want.items():
        if tensors[name].shape != param.shape:
            raise ConfigError(
                f"exit head {path}: {name} has shape {list(tensors[name].shape)}, not {list(param.shape)}"
            )
        with torch.no_grad():
            param.copy_(tensors[name].to(param.dtype))
    return exit_head, meta


def load_exit_draft(
    model_dir: Path, path: Path, dtype: torch.dtype = torch.float32, engine: str = "fast"
) -> ExitDraftNet:
    """The self-speculative drafter of the model in `model_dir` with the exit head saved at `path`; with tied
    embeddings, the embedding and the LM head share one tensor.

    Raises:
        ConfigError: the file does not fit the model (see `load_exit_head`).
        ModelError: the model cannot be read.
    """
    from edgellm.split.one_process import load_stages
    from edgellm.store.weights import load_config

    model_config = load_config(model_dir)
    model = model_identity(model_dir, model_config)
    meta = read_exit_meta(path)
    check_meta(meta, model, path)  # before reading any weights
    layers = model["num_layers"]
    stage, head_stage = load_stages(
        model_dir, [StageSpec(0, meta.layer, embed=True), StageSpec(layers, layers, head=True)], dtype, engine=engine
    )
    _share_tied(stage.embed, head_stage.head)
    exit_head, _ = load_exit_head(path, head_stage, model)
    return ExitDraftNet(stage, exit_head).requires_grad_(False).eval()


def _share_tied(embed: nn.Module | None, head: nn.Module | None) -> None:
    """Make the head use the embedding's weight when the model ties them (equal values, as loaded into two
    stages): the drafter then holds the largest matrix once (V x D: 28M of SmolLM2-135M's 135M parameters)."""
    weight = getattr(embed, "weight", None)
    if not isinstance(head, nn.Linear) or not isinstance(weight, nn.Parameter) or weight.shape != head.weight.shape:
        return
    if head.weight is not weight and torch.equal(head.weight, weight):
        head.weight = weight
