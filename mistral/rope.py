"""Rotary position embedding, shared by both backends: frequencies (plain or YaRN), the magnitude
YaRN gives q and k, and Ministral 3's position-dependent query scaling, all in numpy."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mistral.args import Llama4ScalingArgs, ModelArgs, YarnArgs


def inv_frequencies(head_dim: int, theta: float) -> np.ndarray:
    """(head_dim // 2,) float32: the angle per position of each adjacent pair (x[2i], x[2i+1])."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
    return (1.0 / theta**exponents).astype(np.float32)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """The magnitude YaRN gives q and k (so attention logits grow by its square)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def softmax_scale(args: ModelArgs, head_dim: int) -> float:
    """The attention logits' scale, 1/sqrt(head_dim), times DeepSeek's YaRN factor
    mscale(factor, mscale_all_dim)^2 where latent attention's YaRN has one."""
    y = args.yarn
    extra = (
        1.0 if y is None or y.mscale_all_dim is None else yarn_mscale(y.factor, y.mscale_all_dim)
    )
    return head_dim**-0.5 * extra**2


def yarn_frequencies(head_dim: int, theta: float, yarn: YarnArgs) -> np.ndarray:
    """(head_dim // 2,) float32: pairs that turn fewer than ``alpha`` times over the original
    context are interpolated (frequency / factor), pairs that turn more than ``beta`` times keep
    their frequency, and a linear ramp joins the two, over whole pair indices.

    E.g. head_dim 8, theta 1e4, original context 32, beta 32, alpha 1: pair i turns
    32 theta^(-2i/8) / (2 pi) = 5.1, 0.51, 0.051, 0.0051 times over the original context; the dims
    that turn beta and alpha times are -0.80 and 0.71, so low = max(floor(-0.80), 0) = 0 and
    high = ceil(0.71) = 1, ramp = clip((i - low) / (high - low), 0, 1) = [0, 1, 1, 1]: pair 0
    keeps its frequency, pairs 1..3 are divided by the factor."""
    dim = head_dim
    orig = yarn.original_max_position_embeddings

    def turning_dim(rotations: float) -> float:  # the pair dim that turns `rotations` times
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(turning_dim(yarn.beta)), 0)
    high = min(math.ceil(turning_dim(yarn.alpha)), dim - 1)
    if low == high:
        high += 0.001  # as transformers and mlx-lm: a ramp of (almost) no width
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    keep = 1.0 - ramp  # 1: the pair keeps its frequency, 0: it is interpolated
    base = inv_frequencies(head_dim, theta).astype(np.float64)
    return (base / yarn.factor * (1 - keep) + base * keep).astype(np.float32)


def query_scales(scaling: Llama4ScalingArgs, positions: np.ndarray) -> np.ndarray:
    """Ministral 3's query scale at each absolute position, float32 of positions' shape."""
    periods = np.floor(positions / scaling.original_max_position_embeddings)
    return (1.0 + scaling.beta * np.log1p(periods)).astype(np.float32)


@dataclass(frozen=True)
class Rope:
    """What both backends need to rotate q and k: frequencies, a magnitude (1 but under YaRN
    with its scale), and the query scaling by position (None: every query scale is 1)."""

    inv_freq: np.ndarray  # (rope_dim // 2,) float32
    mscale: float
    scaling: Llama4ScalingArgs | None

    @classmethod
    def of(cls, args: ModelArgs) -> Rope:
        dim = args.rope_dim  # head_dim, or latent attention's RoPE part
        if args.yarn is None:
            return cls(inv_frequencies(dim, args.rope_theta), 1.0, args.llama_4_scaling)
        y = args.yarn
        mscale = yarn_mscale(y.factor) if y.apply_scale else 1.0
        freqs = yarn_frequencies(dim, args.rope_theta, y)
        return cls(freqs, mscale, args.llama_4_scaling)

    def query_scales(self, positions: np.ndarray) -> np.ndarray | None:
        """(B, T) float32 scales of the queries at these positions, or None where all are 1."""
        return None if self.scaling is None else query_scales(self.scaling, positions)
