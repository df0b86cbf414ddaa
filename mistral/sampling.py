"""Choosing the next token from float32 logits: greedy, temperature, nucleus (top-p)."""

from __future__ import annotations

import numpy as np


def sample(
    logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator
) -> np.ndarray:
    """(B, V) logits -> (B,) token ids; greedy at temperature 0."""
    if temperature <= 0:
        return logits.argmax(-1)
    z = logits.astype(np.float64) / temperature
    probs = np.exp(z - z.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.empty(len(probs), dtype=np.int64)
    for b, p in enumerate(probs):
        order = np.argsort(-p, kind="stable")
        sorted_p = p[order]
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        keep = np.cumsum(sorted_p) - sorted_p < top_p
        kept = sorted_p * keep
        out[b] = order[rng.choice(len(kept), p=kept / kept.sum())]
    return out
