"""Checks a stage applies to requests from peers before running them: dtypes, shapes and ranges."""

from __future__ import annotations

import torch

from edgellm.model.stage import Stage
from edgellm.net.messages import ForwardRequest, WireError

MAX_BATCH = 64


def check_request(request: ForwardRequest, stage: Stage, max_batch: int = MAX_BATCH) -> None:
    """Refuse a request this stage cannot run correctly.

    Raises:
        WireError: wrong dtype or rank, hidden size other than the model's, token ids outside the vocabulary,
            mismatched positions or mask, negative positions, batch or sequence beyond the limits.
    """
    check_inputs(request.data, request.positions, request.token_mask, stage, max_batch)
    if request.rows:
        batch, seq = request.data.shape[:2]
        if len(request.rows) != batch or seq != 1 or request.token_mask is not None or request.new_session:
            raise WireError(f"a request of {len(request.rows)} sessions' rows must be one new token per row, no mask, "
                            f"no session start; got data {list(request.data.shape)}")  # fmt: skip
        if len(set(request.rows)) != len(request.rows) or not all(request.rows):
            raise WireError("a request's rows must name distinct sessions")


def check_hidden(
    data: torch.Tensor,
    positions: torch.Tensor,
    token_mask: torch.Tensor | None,
    stage: Stage,
    max_batch: int = MAX_BATCH,
) -> None:
    """`check_inputs` for a training request: the stage must take hidden states (token ids never leave the
    device in split learning)."""
    if stage.spec.embed:
        raise WireError("this node holds the embedding: split learning sends it hidden states, never token ids")
    check_inputs(data, positions, token_mask, stage, max_batch)


def check_inputs(
    data: torch.Tensor,
    positions: torch.Tensor,
    token_mask: torch.Tensor | None,
    stage: Stage,
    max_batch: int = MAX_BATCH,
) -> None:
    """The checks of `check_request` on its tensors (see there)."""
    dims = stage.dims
    if stage.spec.embed:
        if data.dtype != torch.int64 or data.dim() != 2:
            raise WireError(f"the first stage takes int64 token ids [B, S], got {data.dtype} {list(data.shape)}")
        if data.numel() and (int(data.min()) < 0 or int(data.max()) >= dims.vocab_size):
            raise WireError(f"token ids must lie in [0, {dims.vocab_size})")
    else:
        if not data.is_floating_point() or data.dim() != 3:
            raise WireError(f"this stage takes hidden states [B, S, D], got {data.dtype} {list(data.shape)}")
        if data.shape[-1] != dims.hidden_size:
            raise WireError(f"hidden size {data.shape[-1]} does not match the model's {dims.hidden_size}")
    batch, seq = data.shape[:2]
    if not 1 <= batch <= max_batch:
        raise WireError(f"batch size {batch} is outside 1..{max_batch}")
    if not 1 <= seq <= dims.max_length:
        raise WireError(f"sequence chunk of {seq} tokens is outside 1..{dims.max_length}")
    if positions.dtype != torch.int64 or tuple(positions.shape) != (batch, seq):
        raise WireError(f"positions must be int64 [{batch}, {seq}], got {positions.dtype} {list(positions.shape)}")
    if int(positions.min()) < 0:
        raise WireError("positions must be >= 0")
    if token_mask is not None and (token_mask.dtype != torch.bool or tuple(token_mask.shape) != (batch, seq)):
        raise WireError(f"token_mask must be bool [{batch}, {seq}], got {token_mask.dtype} {list(token_mask.shape)}")
