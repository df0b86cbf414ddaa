"""Tensor parallelism in MLX: the group mlx.launch starts (its ring backend runs local processes
on a Linux CPU as on Macs over the network), and the all-sum after the modules whose outputs are
partial sums, put on from outside the forward (mistral/parallel.py says which slices)."""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx

from mistral.errors import MistralError
from mistral.parallel import Shard


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
