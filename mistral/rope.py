"""Rotary position embedding frequencies, shared by both backends."""

from __future__ import annotations

import numpy as np


def inv_frequencies(head_dim: int, theta: float) -> np.ndarray:
    """(head_dim // 2,) float32: the angle per position of each adjacent pair (x[2i], x[2i+1])."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
    return (1.0 / theta**exponents).astype(np.float32)
