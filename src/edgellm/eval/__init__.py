"""Accuracy measurements: perplexity of the split, quantized, codec-compressed model over a text."""

from edgellm.eval.ppl import PplConfig, PplResult, evaluate_ppl, windows

__all__ = ["PplConfig", "PplResult", "evaluate_ppl", "windows"]
