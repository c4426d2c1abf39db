"""Label recovery from the gradient the device returns in U-shaped split learning.

The device's head is the final RMSNorm and the tied LM head: logits = E (s * h / rms(h)), with s the norm's scale
and E the embedding matrix, both public. For cross-entropy at one position, d loss / d logits = p - onehot(y), so
the gradient the device sends back for the last server's output row h is

    g = d loss / d h = (1 / rms(h)) P (s * E^T (p - onehot(y))),   P = I - h^ h^T / D  (h^ = h / rms(h))

a positive multiple of sum_v (p_v - [v = y]) P(s * E_v). Its inner product with each token's direction s * E_v
(P drops out: g already lies in P's range) is most negative for the label y, whose coefficient is -(1 - p_y);
only positions that carry a label have a nonzero gradient. The attacker needs neither p nor h.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def label_directions(head: torch.Tensor, norm_scale: torch.Tensor) -> torch.Tensor:
    """Each token's logit direction in the space of the final norm's input: `head * norm_scale`.

    head: [V, D] LM head (= the embedding when tied), norm_scale: [D] -> [V, D] float32
    """
    return head.float() * norm_scale.float().unsqueeze(0)


def recover_labels(grads: torch.Tensor, directions: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """The label of each gradient row: the token whose (unit) logit direction has the most negative inner product
    with it.

    grads: [N, D] rows of d loss / d h (labelled positions only), directions: [V, D] -> [N] int64 token ids
    """
    unit = F.normalize(directions.float(), dim=-1)
    out = [(grads[i : i + batch].float() @ unit.T).argmin(dim=-1) for i in range(0, grads.shape[0], batch)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def labelled_rows(grads: torch.Tensor, min_norm: float = 0.0) -> torch.Tensor:
    """Which rows of a returned gradient carry a label: those with a nonzero gradient.

    grads: [B, S, D] -> [B, S] bool
    """
    return torch.linalg.vector_norm(grads.float(), dim=-1) > min_norm
