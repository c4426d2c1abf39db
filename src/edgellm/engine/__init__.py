"""The fast engine: decoder blocks run with as little Python per token as the math allows (Llama family, Gemma 3,
Phi-3)."""
