"""Every message that crosses between a device and its stages, in one place.

In one process these objects are passed as they are (see `edgellm.net.local`); network transports encode them
with the codec that lives beside them. Messages are frozen and carry a protocol version.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PROTOCOL_VERSION = 1


@dataclass(frozen=True)
class ForwardRequest:
    """Run a stage on the next tokens of a session.

    Attributes:
        session: the session id; the stage keys its KV cache by it.
        data: [B, S] int64 token ids for an embedding stage, else [B, S, D] hidden states ("smashed data").
        positions: [B, S] int64 absolute positions of the tokens.
        token_mask: [B, S] bool, False marks padding; None means no padding.
        new_session: True on a session's first request; a stage refuses unknown sessions otherwise.
        last_only: a head stage returns logits of the last position only.
        version: protocol version of the sender.
    """

    session: str
    data: torch.Tensor
    positions: torch.Tensor
    token_mask: torch.Tensor | None = None
    new_session: bool = False
    last_only: bool = False
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class ForwardReply:
    """A stage's output: [B, S, D] hidden states, or float32 logits for a head stage; and its compute time."""

    output: torch.Tensor
    compute_ms: float


@dataclass(frozen=True)
class CloseSession:
    """Drop a session's KV cache."""

    session: str
    version: int = PROTOCOL_VERSION
