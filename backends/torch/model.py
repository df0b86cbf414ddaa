"""The Mistral transformer in PyTorch; attribute names equal the checkpoint keys."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backends.torch.cache import LayerCache, Step
from mistral.args import ModelArgs, MoeArgs
from mistral.cache import Window
from mistral.rope import softmax_scale
from mistral.taps import Recorder


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalizes in float32, casts back, then scales.
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


class Linear(nn.Linear):
    """A bias-free nn.Linear whose product x @ weight.T the runner's build may give to a faster
    kernel for the device (`kernel`, a callable (x, weight)); None keeps the framework's own."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__(dim_in, dim_out, bias=False)
        self.kernel: Callable | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) if self.kernel is None else self.kernel(x, self.weight)


def scaled_attention(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor, scale: float) -> Tensor:
    """Softmax attention of (B, H, T, d) queries over (B, Hkv, K, d) keys and values, each key
    head serving H / Hkv query heads (GQA); mask (B, 1, T, K) bool, True where a key is seen."""
    return F.scaled_dot_product_attention(
        q, keys, values, attn_mask=mask, scale=scale, enable_gqa=True
    )


def rope(x: torch.Tensor, step: Step) -> torch.Tensor:
    """Rotates the adjacent pairs (x[2i], x[2i+1]) of (B, H, T, D) by each token's angles."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, H, T, D/2) complex
    out = torch.view_as_real(pairs * step.rotation).flatten(-2).type_as(x)
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

    def new_cache(self, batch: int, size: int, dtype: torch.dtype) -> LayerCache:
        return LayerCache(batch, size, self.n_kv_heads, self.head_dim, self.head_dim, dtype)

    def forward(self, x: torch.Tensor, step: Step, cache: LayerCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        # q: (B, H, T, D); k, v: (B, Hkv, T, D)
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = self.tap("q", rope(q, step))  # (B, H, T, D)
        k = self.tap("k", rope(k, step))
        if step.q_scale is not None:  # Ministral 3 scales the queries by position, not the keys
            q = q * step.q_scale.to(q.dtype)

        # Without a cache the step attends over the new tokens alone.
        keys, values = (k, v) if cache is None else cache.update(k, v, step)  # (B, Hkv, K, D)
        # GQA: each key/value head serves n_heads / n_kv_heads query heads.
        out = scaled_attention(q, keys, values, step.mask, self.scale)  # (B, H, T, D)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


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

    def new_cache(self, batch: int, size: int, dtype: torch.dtype) -> LayerCache:
        return LayerCache(batch, size, 1, self.rank, self.rope, dtype)  # latents, RoPE keys

    def forward(self, x: torch.Tensor, step: Step, cache: LayerCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x) if self.q_lora_rank is None else self.wq_b(self.q_a_norm(self.wq_a(x)))
        q = q.reshape(B, T, self.n_heads, -1).swapaxes(1, 2)  # (B, H, T, nope + rope)
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
        latent, k_rope = self.wkv_a_with_mqa(x).split([self.rank, self.rope], dim=-1)
        latent = self.kv_a_norm(latent)[:, None]  # (B, 1, T, rank)
        q_rope = self.tap("q", rope(q_rope, step))  # (B, H, T, rope)
        k_rope = self.tap("k", rope(k_rope[:, None], step))  # (B, 1, T, rope)
        if step.q_scale is not None:  # Mistral Small 4 scales the whole query by position
            s = step.q_scale.to(q.dtype)
            q_nope, q_rope = q_nope * s, q_rope * s

        latents, k_ropes = (latent, k_rope) if cache is None else cache.update(latent, k_rope, step)
        attend = self.absorbed if step.key_layout == "cache" else self.expanded
        out = attend(q_nope, q_rope, latents, k_ropes, step.mask)  # (B, H, T, v)
        return self.wo(out.swapaxes(1, 2).reshape(B, T, -1))

    def expanded(
        self, q_nope: Tensor, q_rope: Tensor, latents: Tensor, k_ropes: Tensor, mask: Tensor
    ) -> Tensor:
        """Keys and values of every head from the (B, 1, K, rank) latents."""
        B, _, K, _ = latents.shape
        kv = self.wkv_b(latents[:, 0]).reshape(B, K, self.n_heads, -1).swapaxes(1, 2)
        k_nope, values = kv.split([self.nope, self.v_dim], dim=-1)  # (B, H, K, nope | v)
        k_ropes = torch.broadcast_to(k_ropes, (B, self.n_heads, K, self.rope))
        keys = torch.cat([k_nope, k_ropes], dim=-1)
        queries = torch.cat([q_nope, q_rope], dim=-1)  # (B, H, T, nope + rope)
        return scaled_attention(queries, keys, values, mask, self.scale)

    def absorbed(
        self, q_nope: Tensor, q_rope: Tensor, latents: Tensor, k_ropes: Tensor, mask: Tensor
    ) -> Tensor:
        """The same attention with wkv_b folded in: q_nope . (W_k c) = (q_nope W_k) . c, and the
        values' product W_v moved past the weighted sum over the latents c."""
        w = self.wkv_b.weight.reshape(self.n_heads, self.nope + self.v_dim, self.rank)
        w_k, w_v = w.split([self.nope, self.v_dim], dim=1)  # (H, nope, rank), (H, v, rank)
        queries = torch.cat([q_nope @ w_k, q_rope], dim=-1)  # (B, H, T, rank + rope)
        keys = torch.cat([latents, k_ropes], dim=-1)  # (B, 1, K, rank + rope), for all heads
        out = scaled_attention(queries, keys, latents, mask, self.scale)  # (B, H, T, rank)
        return out @ w_v.swapaxes(1, 2)  # (B, H, T, v)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = Linear(dim, hidden_dim)
        self.w2 = Linear(hidden_dim, dim)
        self.w3 = Linear(dim, hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Router(Linear):
    """The gate's product, with DeepSeek-V3's per-expert bias when its scores are sigmoids."""

    def __init__(self, dim: int, n_experts: int, biased: bool) -> None:
        super().__init__(dim, n_experts)
        self.e_score_correction_bias = nn.Parameter(torch.zeros(n_experts)) if biased else None


def route(logits: Tensor, bias: Tensor | None, moe: MoeArgs) -> tuple[Tensor, Tensor]:
    """(N, E) gate logits -> the chosen experts (N, k) and their float32 weights (N, k): softmax
    (or sigmoid) scores; experts picked by score (+ bias) among the best groups' experts."""
    logits = logits.float()
    scores = logits.softmax(-1) if moe.scoring_func == "softmax" else logits.sigmoid()
    choice = scores if bias is None else scores + bias.float()
    if moe.num_expert_groups > 1:  # a group scores by its best expert, or its best two
        groups = choice.unflatten(-1, (moe.num_expert_groups, -1))  # (N, G, E / G)
        best = groups.topk(1 if moe.group_scoring == "max" else 2, dim=-1).values.sum(-1)
        g = moe.num_expert_groups_per_tok
        kept = best.topk(g, dim=-1).indices  # (N, G')
        keep = torch.zeros_like(best, dtype=torch.bool).scatter_(1, kept, True)
        choice = groups.masked_fill(~keep[..., None], float("-inf")).flatten(1)
    k = moe.num_experts_per_tok
    chosen = choice.topk(k, dim=-1).indices  # (N, k)
    weights = scores.gather(1, chosen)
    if moe.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return chosen, weights * moe.routed_scale


class MoeLayer(nn.Module):
    def __init__(self, args: ModelArgs, tap: Recorder) -> None:
        super().__init__()
        assert args.moe is not None
        self.routing = args.moe
        hidden = args.moe.expert_hidden_dim or args.hidden_dim
        n = args.moe.num_experts
        self.gate = Router(args.dim, n, args.moe.scoring_func == "sigmoid")
        self.experts = nn.ModuleList([FeedForward(args.dim, hidden) for _ in range(n)])
        shared = args.moe.num_shared_experts  # run for every token, as one wider feed-forward
        self.shared_experts = FeedForward(args.dim, hidden * shared) if shared else None
        # The experts' w1, w2, w3 stacked, (E, out, in), once the build sets them (stack_experts).
        self.stacked: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.tap = tap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.routed(x)
        return out if self.shared_experts is None else out + self.shared_experts(x)

    def routed(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, dim)
        logits = self.tap("router_logits", self.gate(x))  # (N, E)
        chosen, weights = route(logits, self.gate.e_score_correction_bias, self.routing)
        self.tap("experts", chosen)
        weights = weights.type_as(x)
        if self.stacked is not None and len(x) * len(chosen[0]) <= len(self.experts):
            # Only the chosen experts' weights are read, with no host sync (here: decode steps).
            w1, w2, w3 = (w[chosen] for w in self.stacked)  # (N, k, out, in)
            h = F.silu(torch.einsum("nd,nkhd->nkh", x, w1)) * torch.einsum("nd,nkhd->nkh", x, w3)
            out = torch.einsum("nkh,nkdh->nkd", h, w2)  # (N, k, dim)
            return (out * weights[..., None]).sum(1).reshape(shape)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(chosen == e)  # the tokens that chose expert e
            if len(tok):
                out.index_add_(0, tok, weights[tok, slot, None] * expert(x[tok]))
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

    def forward(self, x: torch.Tensor, step: Step, cache: LayerCache | None) -> torch.Tensor:
        x_norm = self.tap("attention_norm", self.attention_norm(x))
        h = x + self.tap("attention", self.attention(x_norm, step, cache))
        h_norm = self.tap("ffn_norm", self.ffn_norm(h))
        return self.tap("residual", h + self.tap("feed_forward", self.feed_forward(h_norm)))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList([TransformerBlock(args, i) for i in range(args.n_layers)])
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = Linear(args.dim, args.vocab_size)
        self.tap = Recorder()

    def new_cache(
        self, batch: int, sizes: dict[Window, int], dtype: torch.dtype
    ) -> list[LayerCache]:
        return [
            layer.attention.new_cache(batch, sizes[layer.window], dtype) for layer in self.layers
        ]

    def recorders(self) -> Iterator[Recorder]:
        yield self.tap
        yield from (layer.tap for layer in self.layers)

    def forward(
        self,
        tokens: torch.Tensor,  # (B, T)
        steps: dict[Window, Step],
        cache: list[LayerCache] | None = None,
        last: torch.Tensor | None = None,  # (B,) index of the one position per row to project
    ) -> torch.Tensor:
        h = self.tap("embeddings", self.tok_embeddings(tokens))  # (B, T, dim)
        for i, layer in enumerate(self.layers):
            h = layer(h, steps[layer.window], None if cache is None else cache[i])
        if last is not None:
            h = h[torch.arange(len(h), device=h.device), last][:, None]  # (B, 1, dim)
        h = self.tap("norm", self.norm(h))
        return self.tap("logits", self.output(h).float())  # (B, T, V) float32 logits
