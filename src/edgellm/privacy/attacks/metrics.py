"""How much of the device's text an attack got back: token recovery rate and ROUGE-L F1 (pure functions).

Token recovery is the fraction of positions whose token id the attack names exactly, the strict per-position
score of SplitLLM/BiSR-style inversion papers. ROUGE-L F1 (Lin, 2004) compares the reconstruction with the original
as word sequences through their longest common subsequence: it forgives a shifted or split word that token
recovery counts as wrong, and is what a reader of the reconstruction would judge.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def recovery_rate(predicted: torch.Tensor | Sequence[int], target: torch.Tensor | Sequence[int]) -> float:
    """Fraction of positions where `predicted` equals `target` (both [N] token ids); 0.0 for N = 0.

    Raises:
        ValueError: the two have different lengths.
    """
    p = torch.as_tensor(predicted).reshape(-1)
    t = torch.as_tensor(target).reshape(-1)
    if p.numel() != t.numel():
        raise ValueError(f"{p.numel()} predicted tokens for {t.numel()} targets")
    return float((p == t).float().mean()) if t.numel() else 0.0


def lcs_length(a: Sequence[object], b: Sequence[object]) -> int:
    """Length of the longest common subsequence of `a` and `b` (dynamic programming, O(len(a) * len(b)) time,
    O(len(b)) memory)."""
    if not a or not b:
        return 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(candidate: Sequence[object], reference: Sequence[object]) -> float:
    """ROUGE-L F1 of `candidate` against `reference` (sequences of words or tokens): the harmonic mean of
    LCS / len(candidate) and LCS / len(reference); 1.0 when both are empty, 0.0 when only one is."""
    if not candidate and not reference:
        return 1.0
    lcs = lcs_length(candidate, reference)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(candidate), lcs / len(reference)
    return 2 * precision * recall / (precision + recall)


def words(text: str) -> list[str]:
    """The whitespace-separated words of `text`, as ROUGE-L compares them here (case kept)."""
    return text.split()
