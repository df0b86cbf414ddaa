"""The rotating KV cache in MLX: it stores and reads where the shared plan says."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from mistral.cache import KeyLayout, StepPlan


@dataclass
class Step:
    """A StepPlan on the device, made once per forward and shared by every layer."""

    keys: KeyLayout
    offsets: mx.array  # (B,) int32, position of each row's first new token (RoPE offset)
    freqs: mx.array  # (D/2,) float32, RoPE period of each pair (1 / inverse frequency)
    mask: mx.array  # (B, 1, T, K) bool, broadcast over heads
    rows: mx.array  # (M,) int32
    cols: mx.array  # (M,) int32
    slots: mx.array  # (M,) int32
    taps: dict[str, mx.array] | None = None  # filled by the forward only when tracing

    def tap(self, layer: int | None, name: str, x: mx.array) -> None:
        """Records x as a named tap (mistral.taps) when tracing; otherwise does nothing."""
        if self.taps is not None:
            self.taps[name if layer is None else f"layers.{layer}.{name}"] = x

    @classmethod
    def from_plan(cls, plan: StepPlan, freqs: mx.array) -> Step:
        """``freqs``: (D/2,) float32, the period of each RoPE pair (1 / the shared frequencies)."""

        def put(a: np.ndarray) -> mx.array:
            return mx.array(a.astype(np.int32) if a.dtype == np.int64 else a)

        return cls(
            keys=plan.keys,
            offsets=put(plan.lengths),
            freqs=freqs,
            mask=put(plan.mask)[:, None],
            rows=put(plan.store_rows),
            cols=put(plan.store_cols),
            slots=put(plan.store_slots),
        )


class RotatingCache:
    """Keys and values of every layer, (B, Hkv, S, D) each, preallocated once."""

    def __init__(
        self,
        n_layers: int,
        batch: int,
        size: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: mx.Dtype,
    ) -> None:
        shape = (batch, n_kv_heads, size, head_dim)
        self.k = [mx.zeros(shape, dtype=dtype) for _ in range(n_layers)]
        self.v = [mx.zeros(shape, dtype=dtype) for _ in range(n_layers)]

    def update(self, layer: int, k: mx.array, v: mx.array, step: Step) -> tuple[mx.array, mx.array]:
        """Stores new (B, Hkv, T, D) keys/values; returns what attention reads, (B, Hkv, K, D)."""
        cache_k, cache_v = self.k[layer], self.v[layer]  # (B, Hkv, S, D)
        if step.keys == "new":
            keys, values = k, v
        elif step.keys == "cache+new":  # read the old slots before this chunk overwrites them
            keys = mx.concatenate([cache_k, k], axis=2)
            values = mx.concatenate([cache_v, v], axis=2)
        cache_k[step.rows, :, step.slots] = k[step.rows, :, step.cols]  # (M, Hkv, D)
        cache_v[step.rows, :, step.slots] = v[step.rows, :, step.cols]
        if step.keys == "cache":
            keys, values = cache_k, cache_v
        return keys, values
