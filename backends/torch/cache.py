"""The plan of one step on the device, and one layer's rotating KV cache, in PyTorch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mistral.cache import KeyLayout, StepPlan
from mistral.rope import Rope


@dataclass
class Step:
    """A StepPlan on the device, made once per forward and shared by every layer."""

    key_layout: KeyLayout
    rotation: torch.Tensor  # (B, 1, T, D/2) complex64: e^(i * angle) per new token and pair
    mscale: float  # the magnitude of the rotation (1 but under YaRN with its scale)
    q_scale: torch.Tensor | None  # (B, 1, T, 1) float32 query scale by position; None: all 1
    mask: torch.Tensor  # (B, 1, T, K) bool, broadcast over heads
    rows: torch.Tensor  # (M,) int64
    cols: torch.Tensor  # (M,) int64
    slots: torch.Tensor  # (M,) int64

    @classmethod
    def from_plan(cls, plan: StepPlan, rope: Rope, inv_freq: torch.Tensor) -> Step:
        """``inv_freq``: (D/2,) float32 on the device, ``rope.inv_freq`` put there once."""
        device = inv_freq.device

        def put(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a).to(device, non_blocking=True)

        angles = put(plan.positions)[:, None, :, None] * inv_freq  # (B, 1, T, D/2)
        q_scale = rope.query_scales(plan.positions)  # (B, T) or None
        return cls(
            key_layout=plan.key_layout,
            rotation=torch.polar(torch.ones_like(angles), angles),
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
        dtype: torch.dtype,
    ) -> None:
        self.k = torch.zeros((batch, n_kv_heads, size, k_dim), dtype=dtype)  # the runner's device
        self.v = torch.zeros((batch, n_kv_heads, size, v_dim), dtype=dtype)

    def update(
        self, k: torch.Tensor, v: torch.Tensor, step: Step
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores new (B, Hkv, T, D) keys/values; returns what attention reads, (B, Hkv, K, D)."""
        cache_k, cache_v = self.k, self.v  # (B, Hkv, S, D)
        if step.key_layout == "new":
            keys, values = k, v
        elif step.key_layout == "cache+new":  # read the old slots before this chunk overwrites them
            keys = torch.cat([cache_k, k], dim=2)
            values = torch.cat([cache_v, v], dim=2)
        cache_k[step.rows, :, step.slots] = k[step.rows, :, step.cols]  # (M, Hkv, D)
        cache_v[step.rows, :, step.slots] = v[step.rows, :, step.cols]
        if step.key_layout == "cache":
            keys, values = cache_k, cache_v
        return keys, values
