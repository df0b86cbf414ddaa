"""Tensor and pipeline parallelism, framework-neutral: which slice of each weight a rank holds.

Each of ``world`` ranks holds a contiguous share of the query heads, of the key/value heads and of
the feed-forward's hidden units: the rows of wq, wk, wv, w1 and w3 (their outputs), the columns
of wo and w2 (their inputs). A rank's attention and feed-forward then give partial sums of the
residual update, which one all-reduce after wo and one after w2 complete. The embedding table and
the output projection split by vocabulary: a rank embeds the ids in its rows (zeros for the rest,
summed over the ranks) and projects onto its rows, whose logits are gathered. Norms and routers
are held whole by every rank, so every rank computes the same logits.

E.g. 8 query heads of 16 over 4 kv heads, hidden 96, vocabulary 1000, 2 ranks: rank 1 holds wq
rows 64..127 (heads 4..7), wk and wv rows 32..63 (kv heads 2..3, the ones its query heads share),
w1 and w3 rows 48..95, wo columns 64..127, w2 columns 48..95, embedding and output rows 500..999.
A vocabulary that does not divide is split in blocks of ceil(V / world), the last rank's shorter
(its logits padded for the gather).

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
# Split by output rows, per head or hidden unit: the attention's query, key and value projections
# (latent attention: wq or wq_b, and wkv_b, the latent itself whole on every rank) and every
# feed-forward's w1 and w3 (dense, each expert's, the shared experts'); by input columns: wo, w2.
ROWS = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight")
ROWS += ("attention.wq_b.weight", "attention.wkv_b.weight")
FFN_ROWS, FFN_COLUMNS = (".w1.weight", ".w3.weight"), (".w2.weight",)
REDUCED = ("attention.wo", "feed_forward.w2")  # the modules whose outputs are all-reduced
# (MoE layers: the layer's output, once, after the weighted sum of its experts' partial sums)


@dataclass(frozen=True)
class Shard:
    rank: int
    world: int


def kv_heads(args: ModelArgs, shard: Shard) -> range:
    """The key/value heads a rank holds: its share when they split over the ranks; else the one
    head its query heads all share, replicated on the ranks that share it."""
    H, K, w = args.n_heads, args.n_kv_heads, shard.world
    if K % w == 0:
        return range(shard.rank * K // w, (shard.rank + 1) * K // w)
    per_rank, per_kv = H // w, H // K  # query heads per rank, query heads per kv head
    if per_kv % per_rank:
        raise MistralError(
            f"n_kv_heads ({K}) does not split over {w} ranks, and a rank's {per_rank} query "
            f"heads would need parts of two"
        )
    first = shard.rank * per_rank // per_kv
    return range(first, first + 1)


def vocab_rows(vocab_size: int, shard: Shard) -> range:
    """The rows of the embedding table and of the output projection a tensor rank holds."""
    per = -(-vocab_size // shard.world)
    return range(min(shard.rank * per, vocab_size), min((shard.rank + 1) * per, vocab_size))


def local_args(args: ModelArgs, shard: Shard) -> ModelArgs:
    """The shapes one rank builds: its share of the heads, of the hidden units (of every
    expert) and of the vocabulary."""
    w = shard.world
    m = args.moe
    sizes = {"n_heads": args.n_heads, "hidden_dim": args.hidden_dim}
    if m is not None and m.expert_hidden_dim is not None:
        sizes["moe.expert_hidden_dim"] = m.expert_hidden_dim
    for name, n in sizes.items():
        if n % w:
            raise MistralError(f"{name} ({n}) does not split over {w} ranks")
    if not vocab_rows(args.vocab_size, shard):
        raise MistralError(f"a vocabulary of {args.vocab_size} leaves rank {shard.rank} no rows")
    local = dataclasses.replace(
        args,
        n_heads=args.n_heads // w,
        n_kv_heads=args.n_heads // w if args.mla else len(kv_heads(args, shard)),  # MLA: unused
        hidden_dim=args.hidden_dim // w,
        vocab_size=len(vocab_rows(args.vocab_size, shard)),
    )
    if m is not None and m.expert_hidden_dim is not None:
        local.moe = dataclasses.replace(m, expert_hidden_dim=m.expert_hidden_dim // w)
    return local


VOCAB = ("tok_embeddings.weight", "output.weight")


def split_of(name: str) -> str | None:
    """ "rows", "columns", "vocab" (rows by vocabulary), or None (held whole) for a tensor of
    the spec."""
    if name in VOCAB:
        return "vocab"
    ffn = ".feed_forward." in name
    if name.endswith(ROWS) or (ffn and name.endswith(FFN_ROWS)):
        return "rows"
    if name.endswith("attention.wo.weight") or (ffn and name.endswith(FFN_COLUMNS)):
        return "columns"
    return None


def shard_tensors(
    args: ModelArgs, tensors: Mapping[str, RawTensor], shard: Shard
) -> dict[str, RawTensor]:
    """This rank's slices, as views: only they are read from the (memory-mapped) files."""
    if any(not isinstance(t, RawTensor) for t in tensors.values()):
        raise MistralError("tensor parallelism of quantized weights is not supported yet")
    local_args(args, shard)  # refuses what does not split
    kv = None if args.mla else kv_heads(args, shard)
    out = {}
    for name, t in tensors.items():
        split = split_of(name)
        if split is None:
            out[name] = t
        elif split == "vocab":
            rows = vocab_rows(args.vocab_size, shard)
            out[name] = rows_of(t, rows.start, rows.stop)
        elif kv is not None and name.endswith(("attention.wk.weight", "attention.wv.weight")):
            out[name] = rows_of(t, kv.start * args.head_dim, kv.stop * args.head_dim)
        else:
            axis = 0 if split == "rows" else 1
            n = t.shape[axis] // shard.world
            take = rows_of if split == "rows" else columns_of
            out[name] = take(t, shard.rank * n, (shard.rank + 1) * n)
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


def rank_share(
    args: ModelArgs, tensors: Mapping[str, Any], kind: str, shard: Shard
) -> tuple[ModelArgs, dict[str, Any]]:
    """The shapes a rank builds and the tensors it reads: a share of every layer (tensor) or a
    block of whole layers under the model's own shapes (pipeline)."""
    if kind == "tensor":
        return local_args(args, shard), shard_tensors(args, tensors, shard)
    return args, stage_tensors(args, tensors, shard)
