"""mlx-lm's absorbed form of latent attention's kv_b_proj: two per-head halves, read and written.

mlx-lm's deepseek_v3 and mistral4 (and so the folders its convert writes) hold kv_b_proj, (H *
(nope + v), rank), as ``embed_q``, (H, rank, nope): each head's key rows transposed, and
``unembed_out``, (H, v, rank): its value rows, each quantized along its last axis when the folder
is. E.g. 4 heads, nope 32, v 32, rank 64: kv_b_proj is (256, 64); head 1's rows 64..95 are
embed_q[1].T and rows 96..127 unembed_out[1]. mlx-lm's deepseek_v2 keeps kv_b_proj as it is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from mistral import quant
from mistral.args import ModelArgs
from mistral.errors import MistralError
from mistral.weights import RawTensor, from_numpy, nbytes_of

HALVES = ("embed_q", "unembed_out")
_KEY_HALF = re.compile(r"(.*\.self_attn\.)embed_q\.weight$")
_KV_B = re.compile(r"(.*\.self_attn\.)kv_b_proj\.weight$")


def join_halves(
    args: ModelArgs, tensors: dict[str, RawTensor], quantization: dict[str, Any] | None, source: str
) -> dict[str, RawTensor]:
    """Each layer's embed_q and unembed_out as its kv_b_proj, in the halves' dtype (codes
    dequantized as mx.dequantize does, in their scales' dtype); other tensors as they are."""
    out = dict(tensors)
    for name in tensors:
        match = _KEY_HALF.match(name)
        if match is None:
            continue
        prefix = match.group(1)
        (k, k_dtype), (v, v_dtype) = (half(out, prefix + h, quantization, source) for h in HALVES)
        H, rank, nope, v_dim = (
            args.n_heads,
            args.kv_lora_rank,
            args.qk_nope_head_dim,
            args.v_head_dim,
        )
        if k.shape != (H, rank, nope) or v.shape != (H, v_dim, rank) or k_dtype != v_dtype:
            raise MistralError(
                f"{source}: {prefix}embed_q {k.shape} and unembed_out {v.shape} are not the "
                f"halves of a kv_b_proj of {H} heads, rank {rank}, {nope} + {v_dim} per head"
            )
        kv = np.concatenate([k.swapaxes(1, 2), v], axis=1)  # (H, nope + v, rank)
        out[prefix + "kv_b_proj.weight"] = from_numpy(kv.reshape(-1, rank), k_dtype)
    return out


def half(
    tensors: dict[str, RawTensor], module: str, quantization: dict[str, Any] | None, source: str
) -> tuple[np.ndarray, str]:
    """One half, taken out of ``tensors``: float32 values (H, a, b) and the dtype they hold."""
    parts = {p: tensors.pop(f"{module}.{p}", None) for p in ("weight", "scales", "biases")}
    w = parts["weight"]
    if w is None or len(w.shape) != 3:
        raise MistralError(f"{source}: {module}.weight is missing or not one matrix per head")
    if parts["scales"] is None:
        return w.to_numpy(), w.dtype
    if quantization is None:
        raise MistralError(f"{source}: {module}.scales but the config has no quantization block")
    flat = {f"{module}.{p}": RawTensor(t.dtype, t.data.reshape(-1, t.shape[-1]))
            for p, t in parts.items() if t is not None}  # fmt: skip
    if any(t.shape[0] != w.shape[0] * w.shape[1] for t in flat.values()):
        raise MistralError(f"{source}: {module}'s codes, scales and biases differ in shape")
    default, layers = quant.config_quantization(quantization, source)
    qt = quant.gather(flat, default, layers, source)[f"{module}.weight"]
    return quant.dequantize(qt, qt.dtype).reshape(*w.shape[:2], -1), qt.dtype


def split_halves(args: ModelArgs, items: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """Each kv_b_proj (H * (nope + v), rank) as mlx-lm's two halves, made when written."""
    out: list[tuple[str, Any]] = []
    for name, t in items:
        match = _KV_B.match(name)
        if match is None:
            out.append((name, t))
            continue
        for key, h in enumerate(HALVES):
            out.append((match.group(1) + h + ".weight", Half(args, t, key == 0)))
    return out


@dataclass
class Half:
    """embed_q (``key``: H, rank, nope) or unembed_out (H, v, rank) of a kv_b_proj."""

    args: ModelArgs
    kv_b: Any  # a RawTensor (H * (nope + v), rank)
    key: bool

    @property
    def dtype(self) -> str:
        return self.kv_b.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        a = self.args
        if self.key:
            return (a.n_heads, a.kv_lora_rank, a.qk_nope_head_dim)
        return (a.n_heads, a.v_head_dim, a.kv_lora_rank)

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.shape, self.dtype)

    @property
    def data(self) -> np.ndarray:
        a = self.args
        w = self.kv_b.data.reshape(a.n_heads, a.qk_nope_head_dim + a.v_head_dim, -1)
        half = w[:, : a.qk_nope_head_dim].swapaxes(1, 2) if self.key else w[:, a.qk_nope_head_dim :]
        return np.ascontiguousarray(half)

    def to_numpy(self) -> np.ndarray:
        return RawTensor(self.dtype, self.data).to_numpy()
