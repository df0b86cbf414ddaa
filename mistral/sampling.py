"""Choosing the next token from float32 logits: greedy, or a draw after temperature, top-k,
top-p (nucleus) and min-p, applied in that order, as transformers applies its warpers."""

from __future__ import annotations

import numpy as np


def distribution(
    logits: np.ndarray, temperature: float, top_p: float, top_k: int = 0, min_p: float = 0.0
) -> np.ndarray:
    """(B, V) logits -> (B, V) float64 probabilities the sampler draws from: the softmax of
    logits / temperature, kept to the ``top_k`` most likely tokens (0: all; ties with the k-th
    stay), then to the nucleus (the most likely tokens, in order, until their renormalized mass
    reaches top_p; the first always stays), then to the tokens at least ``min_p`` times as likely
    as the most likely one; renormalized, zero elsewhere."""
    # Shifted before dividing: a tiny temperature (1e-308) sends the others to -inf, never NaN.
    z = logits.astype(np.float64)
    with np.errstate(over="ignore"):
        probs = np.exp((z - z.max(-1, keepdims=True)) / temperature)
    probs /= probs.sum(-1, keepdims=True)
    keep = np.ones_like(probs, dtype=bool)
    if 0 < top_k < probs.shape[-1]:
        kth = -np.partition(-probs, top_k - 1, axis=-1)[:, top_k - 1 : top_k]
        keep &= probs >= kth
    kept = np.where(keep, probs, 0.0)
    kept /= kept.sum(-1, keepdims=True)
    order = np.argsort(-kept, axis=-1, kind="stable")
    sorted_p = np.take_along_axis(kept, order, axis=-1)
    before = np.cumsum(sorted_p, axis=-1) - sorted_p  # mass of the likelier tokens
    nucleus = np.zeros_like(keep)
    np.put_along_axis(nucleus, order, before < top_p, axis=-1)
    keep &= nucleus
    if min_p > 0:
        keep &= probs >= min_p * probs.max(-1, keepdims=True)
    kept = np.where(keep, probs, 0.0)
    return kept / kept.sum(-1, keepdims=True)


def sample(
    logits: np.ndarray,
    temperature: float,
    top_p: float,
    rng: np.random.Generator,
    top_k: int = 0,
    min_p: float = 0.0,
) -> np.ndarray:
    """(B, V) logits -> (B,) token ids; greedy at temperature 0."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = distribution(logits, temperature, top_p, top_k, min_p)
    return np.array([rng.choice(len(p), p=p) for p in probs], dtype=np.int64)
