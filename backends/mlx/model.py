"""The Mistral transformer in MLX; attribute names equal the checkpoint keys."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from backends.mlx.cache import LayerCache, Step
from mistral.args import ModelArgs
from mistral.cache import Window
from mistral.taps import Recorder


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = mx.ones((dim,))

    def __call__(self, x: mx.array) -> mx.array:
        # Fused kernel: normalizes in float32, scales, returns x's dtype.
        return mx.fast.rms_norm(x, self.weight, self.eps)


class Linear(nn.Linear):
    """A bias-free nn.Linear whose product x @ weight.T the runner's build may give to a faster
    kernel for the device (`kernel`, a callable (x, weight)); None keeps the framework's own."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__(dim_in, dim_out, bias=False)
        self.kernel: Callable | None = None

    def __call__(self, x: mx.array) -> mx.array:
        return super().__call__(x) if self.kernel is None else self.kernel(x, self.weight)


def rope(x: mx.array, step: Step) -> mx.array:
    """Rotates the adjacent pairs (x[2i], x[2i+1]) of (B, H, T, D) by each token's angles."""
    D = x.shape[-1]
    out = mx.fast.rope(
        x, D, traditional=True, base=None, scale=1.0, offset=step.offsets, freqs=step.freqs
    )
    return out if step.mscale == 1.0 else out * step.mscale


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, tap: Recorder) -> None:
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.head_dim = args.head_dim
        self.scale = args.head_dim**-0.5
        self.wq = Linear(args.dim, args.n_heads * args.head_dim)
        self.wk = Linear(args.dim, args.n_kv_heads * args.head_dim)
        self.wv = Linear(args.dim, args.n_kv_heads * args.head_dim)
        self.wo = Linear(args.n_heads * args.head_dim, args.dim)
        self.tap = tap

    def new_cache(self, batch: int, size: int, dtype: mx.Dtype) -> LayerCache:
        return LayerCache(batch, size, self.n_kv_heads, self.head_dim, dtype)

    def __call__(self, x: mx.array, step: Step, cache: LayerCache | None) -> mx.array:
        B, T, _ = x.shape
        # q: (B, H, T, D); k, v: (B, Hkv, T, D)
        q = self.wq(x).reshape(B, T, self.n_heads, self.head_dim).swapaxes(1, 2)
        k = self.wk(x).reshape(B, T, self.n_kv_heads, self.head_dim).swapaxes(1, 2)
        v = self.wv(x).reshape(B, T, self.n_kv_heads, self.head_dim).swapaxes(1, 2)
        q = self.tap("q", rope(q, step))  # (B, H, T, D)
        k = self.tap("k", rope(k, step))
        if step.q_scale is not None:  # Ministral 3 scales the queries by position, not the keys
            q = q * step.q_scale.astype(q.dtype)

        # Without a cache the step attends over the new tokens alone.
        keys, values = (k, v) if cache is None else cache.update(k, v, step)  # (B, Hkv, K, D)
        # GQA: each key/value head serves n_heads / n_kv_heads query heads.
        out = mx.fast.scaled_dot_product_attention(
            q, keys, values, mask=step.mask, scale=self.scale
        )  # (B, H, T, D)
        return self.wo(out.swapaxes(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.w1 = Linear(args.dim, args.hidden_dim)
        self.w2 = Linear(args.hidden_dim, args.dim)
        self.w3 = Linear(args.dim, args.hidden_dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.w2(nn.silu(self.w1(x)) * self.w3(x))


class MoeLayer(nn.Module):
    def __init__(self, args: ModelArgs, tap: Recorder) -> None:
        super().__init__()
        assert args.moe is not None
        self.num_experts_per_tok = args.moe.num_experts_per_tok
        self.gate = Linear(args.dim, args.moe.num_experts)
        self.experts = [FeedForward(args) for _ in range(args.moe.num_experts)]
        # The experts' w1, w2, w3 stacked, (E, out, in), once the build sets them (stack_experts).
        self.stacked: tuple[mx.array, mx.array, mx.array] | None = None
        self.tap = tap

    def __call__(self, x: mx.array) -> mx.array:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, dim)
        logits = self.tap("router_logits", self.gate(x))  # (N, E)
        k = self.num_experts_per_tok
        chosen = mx.argpartition(-logits, kth=k - 1, axis=-1)[:, :k]  # (N, k), in no order
        weights = mx.take_along_axis(logits, chosen, axis=-1)  # (N, k)
        self.tap("experts", chosen)
        weights = mx.softmax(weights.astype(mx.float32), axis=-1).astype(x.dtype)
        if self.stacked is not None:
            # Only the chosen experts' weights are read, with no host sync (any number of rows).
            w1, w2, w3 = (w.swapaxes(-1, -2) for w in self.stacked)  # (E, in, out)
            xe = mx.expand_dims(x, (-2, -3))  # (N, 1, 1, dim)
            h = mx.gather_mm(xe, w1, rhs_indices=chosen)  # (N, k, 1, hidden)
            h = nn.silu(h) * mx.gather_mm(xe, w3, rhs_indices=chosen)
            out = mx.gather_mm(h, w2, rhs_indices=chosen)[:, :, 0]  # (N, k, dim)
            return (out * weights[..., None]).sum(1).reshape(shape)
        out = mx.zeros_like(x)
        chosen_np = np.array(chosen)  # routing is data-dependent: one host sync per MoE layer
        for e, expert in enumerate(self.experts):
            tok, slot = np.nonzero(chosen_np == e)  # the tokens that chose expert e
            if len(tok):
                tok, slot = mx.array(tok), mx.array(slot)
                out = out.at[tok].add(weights[tok, slot, None] * expert(x[tok]))
        return out.reshape(shape)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.tap = Recorder(f"layers.{layer}.")
        self.window = args.layer_windows()[layer]  # the plan (Step) its attention follows
        self.attention = Attention(args, self.tap)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args) if args.moe is None else MoeLayer(args, self.tap)

    def __call__(self, x: mx.array, step: Step, cache: LayerCache | None) -> mx.array:
        x_norm = self.tap("attention_norm", self.attention_norm(x))
        h = x + self.tap("attention", self.attention(x_norm, step, cache))
        h_norm = self.tap("ffn_norm", self.ffn_norm(h))
        return self.tap("residual", h + self.tap("feed_forward", self.feed_forward(h_norm)))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = [TransformerBlock(args, i) for i in range(args.n_layers)]
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = Linear(args.dim, args.vocab_size)
        self.tap = Recorder()

    def new_cache(self, batch: int, sizes: dict[Window, int], dtype: mx.Dtype) -> list[LayerCache]:
        return [
            layer.attention.new_cache(batch, sizes[layer.window], dtype) for layer in self.layers
        ]

    def recorders(self) -> Iterator[Recorder]:
        yield self.tap
        yield from (layer.tap for layer in self.layers)

    def __call__(
        self,
        tokens: mx.array,  # (B, T)
        steps: dict[Window, Step],
        cache: list[LayerCache] | None = None,
        last: mx.array | None = None,  # (B,) index of the one position per row to project
    ) -> mx.array:
        h = self.tap("embeddings", self.tok_embeddings(tokens))  # (B, T, dim)
        for i, layer in enumerate(self.layers):
            h = layer(h, steps[layer.window], None if cache is None else cache[i])
        if last is not None:
            h = h[mx.arange(h.shape[0]), last][:, None]  # (B, 1, dim)
        h = self.tap("norm", self.norm(h))
        return self.tap("logits", self.output(h).astype(mx.float32))  # (B, T, V) float32 logits
