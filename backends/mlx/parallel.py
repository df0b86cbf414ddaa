"""Tensor and pipeline parallelism in MLX: the group mlx.launch starts (its ring backend runs
local processes on a Linux CPU as on Macs over the network); the all-sum after the modules whose
outputs are partial sums, and a pipeline rank's sends and receives, put on from outside the
forward (mistral/parallel.py says which slices and layers each rank holds)."""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mistral.args import ModelArgs
from mistral.errors import MistralError
from mistral.parallel import Shard, stage_layers


def join() -> tuple[Shard, mx.distributed.Group]:
    """This process's rank among mlx.launch's, and the group."""
    group = mx.distributed.init()
    if group.size() < 2:
        raise MistralError("parallel ranks run under mlx.launch (one process here)")
    return Shard(group.rank(), group.size()), group


def reduced(kernel: Callable | None, group: mx.distributed.Group) -> Callable:
    """x @ weight.T summed over the ranks (each holds a share of the inputs)."""

    def product(x: mx.array, weight: mx.array) -> mx.array:
        y = x @ weight.T if kernel is None else kernel(x, weight)
        return mx.distributed.all_sum(y, group=group)

    return product


def share(data: bytes, group: mx.distributed.Group) -> bytes:
    """Rank 0's bytes on every rank: summed with the others' zeros (exact), its size first."""
    first = group.rank() == 0
    size = mx.array([len(data) if first else 0], dtype=mx.int64)
    n = mx.distributed.all_sum(size, group=group, stream=mx.cpu).item()
    if not n:
        return b""
    buffer = np.frombuffer(data, np.uint8) if first else np.zeros(n, np.uint8)
    summed = mx.distributed.all_sum(mx.array(buffer), group=group, stream=mx.cpu)
    return np.array(summed).tobytes()


def gathered(kernel: Callable | None, group: mx.distributed.Group, vocab_size: int, per: int):
    """The output projection onto this rank's rows of the vocabulary, the ranks' logits gathered
    in rank order (each padded to ``per``, the first ranks' share)."""

    def product(x: mx.array, weight: mx.array) -> mx.array:
        y = x @ weight.T if kernel is None else kernel(x, weight)  # (B, T, rows)
        *lead, rows = y.shape
        y = mx.pad(y, [(0, 0)] * len(lead) + [(0, per - rows)])
        parts = mx.distributed.all_gather(y, group=group)  # (world * B, T, per)
        parts = parts.reshape(group.size(), *lead, per).moveaxis(0, -2)  # (B, T, world, per)
        return parts.reshape(*lead, group.size() * per)[..., :vocab_size]  # (B, T, V)

    return product


class VocabEmbedding(nn.Embedding):
    """A tensor rank's rows of the embedding table (the weight's name stays): the ids outside
    them give zeros, and the sum over the ranks every row (exact: one rank's row, the others'
    zeros)."""

    def __init__(self, rows: range, dim: int, group: mx.distributed.Group) -> None:
        super().__init__(len(rows), dim)
        self.start, self.rows, self.group = rows.start, len(rows), group

    def __call__(self, tokens: mx.array) -> mx.array:
        local = tokens - self.start
        inside = (local >= 0) & (local < self.rows)  # (B, T)
        h = self.weight[mx.clip(local, 0, self.rows - 1)]
        h = h * inside[..., None].astype(h.dtype)  # (B, T, dim)
        return mx.distributed.all_sum(h, group=self.group)


class AllSummed(nn.Module):
    """A MoE layer whose output (its experts' partial sums, weighted) is summed over the ranks."""

    def __init__(self, layer: nn.Module, group: mx.distributed.Group) -> None:
        super().__init__()
        self.layer, self.group = layer, group

    def __call__(self, x: mx.array) -> mx.array:
        return mx.distributed.all_sum(self.layer(x), group=self.group)


class Received(nn.Module):
    """In place of the embeddings on a later pipeline rank: the previous rank's activations."""

    def __init__(self, dim: int, src: int, dtype: mx.Dtype, group: mx.distributed.Group) -> None:
        super().__init__()
        self.dim, self.src, self.dtype, self.group = dim, src, dtype, group

    def __call__(self, tokens: mx.array) -> mx.array:
        shape = (*tokens.shape, self.dim)  # (B, T, dim)
        return mx.distributed.recv(shape, self.dtype, self.src, group=self.group)


class Sent(nn.Module):
    """A pipeline rank's last block, whose output is also sent to the next rank."""

    def __init__(self, block: nn.Module, dst: int, group: mx.distributed.Group) -> None:
        super().__init__()
        self.block, self.dst, self.group = block, dst, group
        self.window, self.attention, self.tap = block.window, block.attention, block.tap

    def __call__(self, *args: object) -> mx.array:
        return mx.distributed.send(self.block(*args), self.dst, group=self.group)


class Broadcast(nn.Module):
    """The last pipeline rank's logits on every rank: summed with the others' zeros (exact).
    On an earlier rank it holds no projection and gives zeros that wait for its send."""

    def __init__(self, output: nn.Module | None, vocab_size: int, group: mx.distributed.Group):
        super().__init__()
        self.output, self.vocab_size, self.group = output, vocab_size, group

    def __call__(self, h: mx.array) -> mx.array:
        if self.output is not None:
            logits = self.output(h)
        else:
            zeros = mx.zeros((*h.shape[:-1], self.vocab_size), dtype=h.dtype)
            logits = mx.depends(zeros, h)  # h holds the send: evaluating the logits sends it
        return mx.distributed.all_sum(logits, group=self.group)


def stage(
    model: nn.Module, args: ModelArgs, shard: Shard, dtype: mx.Dtype, group: mx.distributed.Group
) -> None:
    """Makes a Transformer one pipeline rank's, before its weights load: its block of layers;
    receiving instead of embedding after the first rank; no norm or output before the last."""
    layers = stage_layers(args.n_layers, shard)
    model.layers = model.layers[layers.start : layers.stop]
    if shard.rank > 0:
        model.tok_embeddings = Received(args.dim, shard.rank - 1, dtype, group)
    if shard.rank < shard.world - 1:
        model.norm = nn.Identity()
        model.output = Broadcast(None, args.vocab_size, group)


def connect(model: nn.Module, shard: Shard, group: mx.distributed.Group) -> None:
    """Once the weights are in: the last block of an earlier rank sends its output on, and the
    last rank's logits go to every rank."""
    if shard.rank < shard.world - 1:
        model.layers[-1] = Sent(model.layers[-1], shard.rank + 1, group)
    else:
        model.output = Broadcast(model.output, model.args.vocab_size, group)
