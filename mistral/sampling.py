"""Choosing the next token from float32 logits: greedy, temperature, nucleus (top-p)."""

from __future__ import annotations

import numpy as np


def distribution(logits: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    """(B, V) logits -> (B, V) float64 probabilities the sampler draws from: the softmax of
    logits / temperature, kept to the nucleus (the most likely tokens, in order, until their mass
    reaches top_p; the first always stays) and renormalized; zero elsewhere."""
    # Shifted before dividing: a tiny temperature (1e-308) sends the others to -inf, never NaN.
    z = logits.astype(np.float64)
    with np.errstate(over="ignore"):
        probs = np.exp((z - z.max(-1, keepdims=True)) / temperature)
    probs /= probs.sum(-1, keepdims=True)
    order = np.argsort(-probs, axis=-1, kind="stable")
    sorted_p = np.take_along_axis(probs, order, axis=-1)
    before = np.cumsum(sorted_p, axis=-1) - sorted_p  # mass of the likelier tokens
    keep = np.zeros_like(probs, dtype=bool)
    np.put_along_axis(keep, order, before < top_p, axis=-1)
    kept = np.where(keep, probs, 0.0)
    return kept / kept.sum(-1, keepdims=True)


def sample(
    logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator
) -> np.ndarray:
    """(B, V) logits -> (B,) token ids; greedy at temperature 0."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = distribution(logits, temperature, top_p)
    return np.array([rng.choice(len(p), p=p) for p in probs], dtype=np.int64)
