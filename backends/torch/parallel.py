"""Tensor parallelism in PyTorch: the process group torchrun starts (gloo on CPUs, NCCL on CUDA),
and the all-reduce after the modules whose outputs are partial sums, put on from outside the
forward (mistral/parallel.py says which slices each rank holds)."""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mistral.errors import MistralError
from mistral.parallel import Shard


def join(device: torch.device) -> tuple[Shard, torch.device]:
    """This process's rank among torchrun's, and its device (cuda:LOCAL_RANK on CUDA)."""
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise MistralError("parallel ranks run under torchrun (RANK and WORLD_SIZE are unset)")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(leave)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return Shard(dist.get_rank(), dist.get_world_size()), device


def leave() -> None:
    """At exit, every rank waits for the others before the group is torn down: a rank whose
    peer closed its connections first could abort in gloo's transport."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def reduced(kernel: Callable | None) -> Callable:
    """x @ weight.T summed over the ranks (each holds a share of the inputs)."""

    def product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, weight) if kernel is None else kernel(x, weight)
        dist.all_reduce(y)
        return y

    return product
