"""Tensor and pipeline parallelism, framework-neutral: which slice of each weight a rank holds.

Each of ``world`` ranks holds a contiguous share of the query heads, of the key/value heads and of
the feed-forward's hidden units: the rows of wq, wk, wv, w1 and w3 (their outputs), the columns
of wo and w2 (their inputs). A rank's attention and feed-forward then give partial sums of the
residual update, which one all-reduce after wo and one after w2 complete. Embeddings, norms and
the output projection are held whole by every rank, so every rank computes the same logits.

E.g. 8 query heads of 16 over 4 kv heads, hidden 96, 2 ranks: rank 1 holds wq rows 64..127 (heads
4..7), wk and wv rows 32..63 (kv heads 2..3, the ones its query heads share), w1 and w3 rows
48..95, wo columns 64..127, w2 columns 48..95.

Pipeline: each rank holds a contiguous block of whole layers, ceil(n_layers / world) of them as the
original reference splits them, the embedding table on the first rank and the final norm and
output on the last (the table there too when tied). The first rank embeds and sends its block's
output to the next, which receives it in place of the embeddings; the last rank's logits go to
every rank. E.g. 5 layers over 2 ranks: rank 0 runs layers 0..2, rank 1 layers 3..4.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mistral.args import ModelArgs
from mistral.errors import MistralError
from mistral.weights import RawTensor

KINDS = ("tensor", "pipeline")
ROWS = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight")
ROWS += ("feed_forward.w1.weight", "feed_forward.w3.weight")
COLUMNS = ("attention.wo.weight", "feed_forward.w2.weight")
REDUCED = ("attention.wo", "feed_forward.w2")  # the modules whose outputs are all-reduced


@dataclass(frozen=True)
class Shard:
    rank: int
    world: int


def local_args(args: ModelArgs, shard: Shard) -> ModelArgs:
    """The shapes one rank builds: its share of the heads and hidden units."""
    w = shard.world
    if args.moe is not None:
        raise MistralError("tensor parallelism of MoE layers is not supported yet")
    if args.mla:
        raise MistralError("tensor parallelism of latent attention is not supported yet")
    for name in ("n_heads", "n_kv_heads", "hidden_dim"):
        if getattr(args, name) % w:
            raise MistralError(f"{name} ({getattr(args, name)}) does not split over {w} ranks")
    n_heads, n_kv, hidden = args.n_heads // w, args.n_kv_heads // w, args.hidden_dim // w
    return dataclasses.replace(args, n_heads=n_heads, n_kv_heads=n_kv, hidden_dim=hidden)


def shard_tensors(
    args: ModelArgs, tensors: Mapping[str, RawTensor], shard: Shard
) -> dict[str, RawTensor]:
    """This rank's slices, as views: only they are read from the (memory-mapped) files."""
    if any(not isinstance(t, RawTensor) for t in tensors.values()):
        raise MistralError("tensor parallelism of quantized weights is not supported yet")
    local = local_args(args, shard)
    sizes = {
        "wq": local.n_heads * args.head_dim,
        "wk": local.n_kv_heads * args.head_dim,
        "wv": local.n_kv_heads * args.head_dim,
        "wo": local.n_heads * args.head_dim,
        "w1": local.hidden_dim,
        "w3": local.hidden_dim,
        "w2": local.hidden_dim,
    }
    out = {}
    for name, t in tensors.items():
        if not name.endswith(ROWS + COLUMNS):
            out[name] = t
            continue
        n = sizes[name.split(".")[-2]]
        start, stop = shard.rank * n, (shard.rank + 1) * n
        out[name] = rows_of(t, start, stop) if name.endswith(ROWS) else columns_of(t, start, stop)
    return out


def rows_of(t: RawTensor, start: int, stop: int) -> RawTensor:
    if t.rows is not None:  # rows gathered when read (Hugging Face's wq/wk): gather fewer
        return RawTensor(t.dtype, t.source, t.rows[start:stop])
    return RawTensor(t.dtype, t.source[start:stop])


def columns_of(t: RawTensor, start: int, stop: int) -> RawTensor:
    return RawTensor(t.dtype, t.data[:, start:stop])


def stage_layers(n_layers: int, shard: Shard) -> range:
    """The block of layers a pipeline rank runs (the last rank may hold fewer)."""
    if n_layers < shard.world:
        raise MistralError(f"{n_layers} layers do not split over {shard.world} pipeline ranks")
    per = -(-n_layers // shard.world)
    start = min(shard.rank * per, n_layers)
    layers = range(start, min(start + per, n_layers))
    if not layers:
        raise MistralError(f"{n_layers} layers in blocks of {per} leave rank {shard.rank} none")
    return layers


def stage_tensors(args: ModelArgs, tensors: Mapping[str, Any], shard: Shard) -> dict[str, Any]:
    """A pipeline rank's tensors, its layers renumbered from 0: only they are read from the
    (memory-mapped) files."""
    layers = stage_layers(args.n_layers, shard)
    first, last = shard.rank == 0, shard.rank == shard.world - 1
    out = {}
    for name, t in tensors.items():
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            if int(i) in layers:
                out[f"layers.{int(i) - layers.start}.{rest}"] = t
        elif name.startswith("tok_embeddings."):
            if first or (last and args.tied_embeddings):  # tied: the output's weight too
                out[name] = t
        elif last:  # the final norm and the output projection
            out[name] = t
    return out
