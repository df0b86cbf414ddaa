"""The Mistral transformer in PyTorch; attribute names equal the checkpoint keys."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from backends.torch.cache import LayerCache, Step
from mistral.args import ModelArgs
from mistral.cache import Window
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
        return LayerCache(batch, size, self.n_kv_heads, self.head_dim, dtype)

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
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=step.mask, scale=self.scale, enable_gqa=True
        )  # (B, H, T, D)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.w1 = Linear(args.dim, args.hidden_dim)
        self.w2 = Linear(args.hidden_dim, args.dim)
        self.w3 = Linear(args.dim, args.hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoeLayer(nn.Module):
    def __init__(self, args: ModelArgs, tap: Recorder) -> None:
        super().__init__()
        assert args.moe is not None
        self.num_experts_per_tok = args.moe.num_experts_per_tok
        self.gate = Linear(args.dim, args.moe.num_experts)
        self.experts = nn.ModuleList([FeedForward(args) for _ in range(args.moe.num_experts)])
        # The experts' w1, w2, w3 stacked, (E, out, in), once the build sets them (stack_experts).
        self.stacked: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.tap = tap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, dim)
        logits = self.tap("router_logits", self.gate(x))  # (N, E)
        weights, chosen = torch.topk(logits, self.num_experts_per_tok)  # (N, k)
        self.tap("experts", chosen)
        weights = F.softmax(weights, dim=-1, dtype=torch.float32).type_as(x)
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
        self.attention = Attention(args, self.tap)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args) if args.moe is None else MoeLayer(args, self.tap)

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
