"""The Mistral transformer in MLX; attribute names equal the checkpoint keys."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from backends.mlx.cache import LayerCache, Step
from mistral.args import ModelArgs, MoeArgs
from mistral.cache import Window
from mistral.rope import softmax_scale
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


def scaled_attention(
    q: mx.array, keys: mx.array, values: mx.array, mask: mx.array, scale: float
) -> mx.array:
    """Softmax attention of (B, H, T, d) queries over (B, Hkv, K, d) keys and values, each key
    head serving H / Hkv query heads (GQA); mask (B, 1, T, K) bool, True where a key is seen.
    Half precision on the CPU runs in float32, rounded back: MLX 0.32's CPU kernel computes in
    the inputs' dtype, with twice the error of torch's (Metal's sums are float32 already)."""
    if q.dtype == mx.float32 or mx.default_device() != mx.cpu:
        return mx.fast.scaled_dot_product_attention(q, keys, values, mask=mask, scale=scale)
    wide = (a.astype(mx.float32) for a in (q, keys, values))
    return mx.fast.scaled_dot_product_attention(*wide, mask=mask, scale=scale).astype(q.dtype)


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
        return LayerCache(batch, size, self.n_kv_heads, self.head_dim, self.head_dim, dtype)

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
        out = scaled_attention(q, keys, values, step.mask, self.scale)  # (B, H, T, D)
        return self.wo(out.swapaxes(1, 2).reshape(B, T, -1))


class LatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2, Mistral Small 4). The cache holds per token one
    latent of `rank` numbers and one RoPE key shared by the heads. Prefill expands each head's
    keys and values from the latents (wkv_b); decode folds wkv_b into the queries and the output
    instead ("absorbed") and attends over the latents as they are."""

    def __init__(self, args: ModelArgs, tap: Recorder) -> None:
        super().__init__()
        assert args.mla
        self.n_heads = args.n_heads
        self.nope, self.rope, self.v_dim = (
            args.qk_nope_head_dim,
            args.qk_rope_head_dim,
            args.v_head_dim,
        )
        self.rank = args.kv_lora_rank
        self.scale = softmax_scale(args, self.nope + self.rope)
        self.q_lora_rank = args.q_lora_rank
        qk = args.n_heads * (self.nope + self.rope)
        if args.q_lora_rank is None:
            self.wq = Linear(args.dim, qk)
        else:  # the queries from their own latent; its norm's eps is fixed, as DeepSeek's
            self.wq_a = Linear(args.dim, args.q_lora_rank)
            self.q_a_norm = RMSNorm(args.q_lora_rank, 1e-6)
            self.wq_b = Linear(args.q_lora_rank, qk)
        self.wkv_a_with_mqa = Linear(args.dim, self.rank + self.rope)
        self.kv_a_norm = RMSNorm(self.rank, 1e-6)
        self.wkv_b = Linear(self.rank, args.n_heads * (self.nope + self.v_dim))
        self.wo = Linear(args.n_heads * self.v_dim, args.dim)
        self.tap = tap

    def new_cache(self, batch: int, size: int, dtype: mx.Dtype) -> LayerCache:
        return LayerCache(batch, size, 1, self.rank, self.rope, dtype)  # latents, RoPE keys

    def __call__(self, x: mx.array, step: Step, cache: LayerCache | None) -> mx.array:
        B, T, _ = x.shape
        q = self.wq(x) if self.q_lora_rank is None else self.wq_b(self.q_a_norm(self.wq_a(x)))
        q = q.reshape(B, T, self.n_heads, -1).swapaxes(1, 2)  # (B, H, T, nope + rope)
        q_nope, q_rope = mx.split(q, [self.nope], axis=-1)
        latent, k_rope = mx.split(self.wkv_a_with_mqa(x), [self.rank], axis=-1)
        latent = self.kv_a_norm(latent)[:, None]  # (B, 1, T, rank)
        q_rope = self.tap("q", rope(q_rope, step))  # (B, H, T, rope)
        k_rope = self.tap("k", rope(k_rope[:, None], step))  # (B, 1, T, rope)
        if step.q_scale is not None:  # Mistral Small 4 scales the whole query by position
            s = step.q_scale.astype(q.dtype)
            q_nope, q_rope = q_nope * s, q_rope * s

        latents, k_ropes = (latent, k_rope) if cache is None else cache.update(latent, k_rope, step)
        attend = self.absorbed if step.key_layout == "cache" else self.expanded
        out = attend(q_nope, q_rope, latents, k_ropes, step.mask)  # (B, H, T, v)
        return self.wo(out.swapaxes(1, 2).reshape(B, T, -1))

    def expanded(
        self,
        q_nope: mx.array,
        q_rope: mx.array,
        latents: mx.array,
        k_ropes: mx.array,
        mask: mx.array,
    ) -> mx.array:
        """Keys and values of every head from the (B, 1, K, rank) latents."""
        B, _, K, _ = latents.shape
        kv = self.wkv_b(latents[:, 0]).reshape(B, K, self.n_heads, -1).swapaxes(1, 2)
        k_nope, values = mx.split(kv, [self.nope], axis=-1)  # (B, H, K, nope | v)
        k_ropes = mx.broadcast_to(k_ropes, (B, self.n_heads, K, self.rope))
        keys = mx.concatenate([k_nope, k_ropes], axis=-1)
        queries = mx.concatenate([q_nope, q_rope], axis=-1)  # (B, H, T, nope + rope)
        return scaled_attention(queries, keys, values, mask, self.scale)

    def absorbed(
        self,
        q_nope: mx.array,
        q_rope: mx.array,
        latents: mx.array,
        k_ropes: mx.array,
        mask: mx.array,
    ) -> mx.array:
        """The same attention with wkv_b folded in: q_nope . (W_k c) = (q_nope W_k) . c, and the
        values' product W_v moved past the weighted sum over the latents c."""
        w = self.wkv_b.weight.reshape(self.n_heads, self.nope + self.v_dim, self.rank)
        w_k, w_v = mx.split(w, [self.nope], axis=1)  # (H, nope, rank), (H, v, rank)
        queries = mx.concatenate([q_nope @ w_k, q_rope], axis=-1)  # (B, H, T, rank + rope)
        keys = mx.concatenate([latents, k_ropes], axis=-1)  # (B, 1, K, rank + rope), for all heads
        out = scaled_attention(queries, keys, latents, mask, self.scale)  # (B, H, T, rank)
        return out @ w_v.swapaxes(1, 2)  # (B, H, T, v)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = Linear(dim, hidden_dim)
        self.w2 = Linear(hidden_dim, dim)
        self.w3 = Linear(dim, hidden_dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.w2(nn.silu(self.w1(x)) * self.w3(x))


class Router(Linear):
    """The gate's product, with DeepSeek-V3's per-expert bias when its scores are sigmoids."""

    def __init__(self, dim: int, n_experts: int, biased: bool) -> None:
        super().__init__(dim, n_experts)
        self.e_score_correction_bias = mx.zeros((n_experts,)) if biased else None


def route(logits: mx.array, bias: mx.array | None, moe: MoeArgs) -> tuple[mx.array, mx.array]:
    """(N, E) gate logits -> the chosen experts (N, k) and their float32 weights (N, k): softmax
    (or sigmoid) scores; experts picked by score (+ bias) among the best groups' experts."""
    logits = logits.astype(mx.float32)
    scores = mx.softmax(logits, axis=-1) if moe.scoring_func == "softmax" else mx.sigmoid(logits)
    choice = scores if bias is None else scores + bias.astype(mx.float32)
    if moe.num_expert_groups > 1:  # a group scores by its best expert, or its best two
        groups = mx.unflatten(choice, -1, (moe.num_expert_groups, -1))  # (N, G, E / G)
        best = mx.topk(groups, 1 if moe.group_scoring == "max" else 2, axis=-1).sum(-1)
        g = moe.num_expert_groups_per_tok
        kept = mx.argpartition(-best, kth=g - 1, axis=-1)[:, :g]  # (N, G')
        keep = mx.put_along_axis(mx.zeros_like(best), kept, mx.array(1.0), axis=-1) > 0
        choice = mx.where(keep[..., None], groups, -mx.inf).flatten(1)
    k = moe.num_experts_per_tok
    chosen = mx.argpartition(-choice, kth=k - 1, axis=-1)[:, :k]  # (N, k), in no order
    weights = mx.take_along_axis(scores, chosen, axis=-1)
    if moe.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return chosen, weights * moe.routed_scale


class MoeLayer(nn.Module):
    def __init__(self, args: ModelArgs, tap: Recorder) -> None:
        super().__init__()
        assert args.moe is not None
        self.routing = args.moe
        hidden = args.moe.expert_hidden_dim or args.hidden_dim
        n = args.moe.num_experts
        self.gate = Router(args.dim, n, args.moe.scoring_func == "sigmoid")
        self.experts = [FeedForward(args.dim, hidden) for _ in range(n)]
        shared = args.moe.num_shared_experts  # run for every token, as one wider feed-forward
        self.shared_experts = FeedForward(args.dim, hidden * shared) if shared else None
        # The experts' w1, w2, w3 stacked, (E, out, in), once the build sets them (stack_experts).
        self.stacked: tuple[Callable, Callable, Callable] | None = None
        self.tap = tap

    def __call__(self, x: mx.array) -> mx.array:
        out = self.routed(x)
        return out if self.shared_experts is None else out + self.shared_experts(x)

    def routed(self, x: mx.array) -> mx.array:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, dim)
        logits = self.tap("router_logits", self.gate(x))  # (N, E)
        chosen, weights = route(logits, self.gate.e_score_correction_bias, self.routing)
        self.tap("experts", chosen)
        weights = weights.astype(x.dtype)
        if self.stacked is not None:
            # Only the chosen experts' weights are read, with no host sync (any number of rows).
            w1, w2, w3 = self.stacked  # as products: (x, chosen) -> x times the chosen weights
            xe = mx.expand_dims(x, (-2, -3))  # (N, 1, 1, dim)
            h = nn.silu(w1(xe, chosen)) * w3(xe, chosen)  # (N, k, 1, hidden)
            out = w2(h, chosen)[:, :, 0]  # (N, k, dim)
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
        self.attention = (LatentAttention if args.mla else Attention)(args, self.tap)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = (
            MoeLayer(args, self.tap)
            if args.moe_layer(layer)
            else FeedForward(args.dim, args.hidden_dim)
        )

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
