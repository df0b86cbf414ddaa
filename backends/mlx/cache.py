"""The plan of one step on the device, and one layer's rotating KV cache, in MLX."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from mistral.cache import KeyLayout, StepPlan
from mistral.rope import Rope


@dataclass
class Step:
    """A StepPlan on the device, made once per forward and shared by every layer."""

    key_layout: KeyLayout
    offsets: mx.array  # (B,) int32, position of each row's first new token (RoPE offset)
    freqs: mx.array  # (D/2,) float32, RoPE period of each pair (1 / inverse frequency)
    mscale: float  # the magnitude of the rotation (1 but under YaRN with its scale)
    q_scale: mx.array | None  # (B, 1, T, 1) float32 query scale by position; None: all 1
    mask: mx.array  # (B, 1, T, K) bool, broadcast over heads
    rows: mx.array  # (M,) int32
    cols: mx.array  # (M,) int32
    slots: mx.array  # (M,) int32

    @classmethod
    def from_plan(cls, plan: StepPlan, rope: Rope, freqs: mx.array) -> Step:
        """``freqs``: (D/2,) float32, the period of each pair (1 / ``rope.inv_freq``), made once."""

        def put(a: np.ndarray) -> mx.array:
            return mx.array(a.astype(np.int32) if a.dtype == np.int64 else a)

        q_scale = rope.query_scales(plan.positions)  # (B, T) or None
        return cls(
            key_layout=plan.key_layout,
            offsets=put(plan.lengths),
            freqs=freqs,
            mscale=rope.mscale,
            q_scale=None if q_scale is None else put(q_scale)[:, None, :, None],
            mask=put(plan.mask)[:, None],
            rows=put(plan.store_rows),
            cols=put(plan.store_cols),
            slots=put(plan.store_slots),
        )


class LayerCache:
    """One layer's keys and values, (B, Hkv, S, Dk) and (B, Hkv, S, Dv), preallocated once.
    Latent attention keeps its latent as k and its shared RoPE key as v (Hkv = 1)."""

    def __init__(
        self,
        batch: int,
        size: int,
        n_kv_heads: int,
        k_dim: int,
        v_dim: int,
        dtype: mx.Dtype,
    ) -> None:
        self.k = mx.zeros((batch, n_kv_heads, size, k_dim), dtype=dtype)  # the runner's device
        self.v = mx.zeros((batch, n_kv_heads, size, v_dim), dtype=dtype)

    def update(self, k: mx.array, v: mx.array, step: Step) -> tuple[mx.array, mx.array]:
        """Stores new (B, Hkv, T, D) keys/values; returns what attention reads, (B, Hkv, K, D)."""
        cache_k, cache_v = self.k, self.v  # (B, Hkv, S, D)
        if step.key_layout == "new":
            keys, values = k, v
        elif step.key_layout == "cache+new":  # read the old slots before this chunk overwrites them
            keys = mx.concatenate([cache_k, k], axis=2)
            values = mx.concatenate([cache_v, v], axis=2)
        cache_k[step.rows, :, step.slots] = k[step.rows, :, step.cols]  # (M, Hkv, D)
        cache_v[step.rows, :, step.slots] = v[step.rows, :, step.cols]
        if step.key_layout == "cache":
            keys, values = cache_k, cache_v
        return keys, values
