"""Tensor and pipeline parallelism in PyTorch: the process group torchrun starts (gloo on CPUs,
NCCL on CUDA); the all-reduce after the modules whose outputs are partial sums, and a pipeline
rank's sends and receives, put on from outside the forward (mistral/parallel.py says which slices
and layers each rank holds)."""

from __future__ import annotations

import atexit
import os
import re
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mistral.args import ModelArgs
from mistral.errors import MistralError
from mistral.parallel import Shard, stage_layers


def rank_timeout() -> timedelta:
    """How long a rank waits for the others in one transfer before giving up:
    MISTRAL_RANK_TIMEOUT seconds, 600 by default (a slow rank may still be loading)."""
    value = os.environ.get("MISTRAL_RANK_TIMEOUT", "600")
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < 1e7:
        raise MistralError(f"MISTRAL_RANK_TIMEOUT must be a number of seconds, got {value!r}")
    return timedelta(seconds=seconds)


def join(device: torch.device) -> tuple[Shard, torch.device, dist.ProcessGroup]:
    """This process's rank among torchrun's, its device (cuda:LOCAL_RANK on CUDA), and a gloo
    group for what rank 0 shares from the host (see share)."""
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise MistralError("parallel ranks run under torchrun (RANK and WORLD_SIZE are unset)")
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=rank_timeout())
        atexit.register(leave)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    # A person may take a while to type the next line: no timeout there (a rank that ends is
    # still seen at once, its connections closing).
    host = dist.new_group(backend="gloo", timeout=timedelta(days=30))
    return Shard(dist.get_rank(), dist.get_world_size()), device, host


def share(data: bytes, group: dist.ProcessGroup) -> bytes:
    """Rank 0's bytes on every rank (CPU tensors over gloo, beside NCCL on CUDA)."""
    try:
        size = torch.tensor([len(data)], dtype=torch.int64)
        dist.broadcast(size, 0, group=group)
        if not size.item():
            return b""
        if dist.get_rank() == 0:
            buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        else:
            buffer = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.broadcast(buffer, 0, group=group)
    except RuntimeError as e:
        lost = peer_lost(e)
        if lost is None:
            raise
        raise lost from None
    return buffer.numpy().tobytes()


def leave() -> None:
    """At exit, every rank waits for the others before the group is torn down: a rank whose
    peer closed its connections first could abort in gloo's transport. Where a peer has ended
    already, the group is left as it is."""
    if not dist.is_initialized():
        return
    try:
        dist.barrier()
    except RuntimeError:
        return
    dist.destroy_process_group()


# gloo's and NCCL's words for a peer that ended or went silent
PEER_SIGNS = ("Connection closed", "Connection reset", "imed out", "Broken pipe")
PEER_SIGNS += ("ncclRemoteError", "remote process exited", "communicator was aborted")


def peer_lost(error: RuntimeError) -> MistralError | None:
    """The one-line error of a transfer that failed because another rank ended or stopped
    answering (None: some other error)."""
    text = str(error).strip()
    if not dist.is_initialized() or not any(sign in text for sign in PEER_SIGNS):
        return None
    why = re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0]).split(". ")[0][:160]  # no path
    return MistralError(f"rank {dist.get_rank()}: another rank ended or stopped answering ({why})")


def reduce_output(module: nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
    """A forward hook: the module's output summed over the ranks (a MoE layer's, once)."""
    dist.all_reduce(out)
    return out


def reduced(kernel: Callable | None) -> Callable:
    """x @ weight.T summed over the ranks (each holds a share of the inputs)."""

    def product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, weight) if kernel is None else kernel(x, weight)
        dist.all_reduce(y)
        return y

    return product


def gathered(kernel: Callable | None, vocab_size: int, per: int) -> Callable:
    """The output projection onto this rank's rows of the vocabulary, the ranks' logits gathered
    in rank order (each padded to ``per``, the first ranks' share)."""

    def product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, weight) if kernel is None else kernel(x, weight)  # (B, T, rows)
        y = F.pad(y, (0, per - y.shape[-1])).contiguous()
        parts = [torch.empty_like(y) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, y)
        return torch.cat(parts, dim=-1)[..., :vocab_size]  # (B, T, V)

    return product


class VocabEmbedding(nn.Embedding):
    """A tensor rank's rows of the embedding table (the weight's name stays): the ids outside
    them give zeros, and the sum over the ranks every row (exact: one rank's row, the others'
    zeros)."""

    def __init__(self, rows: range, dim: int) -> None:
        super().__init__(len(rows), dim)
        self.start = rows.start

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.start
        inside = (local >= 0) & (local < self.num_embeddings)  # (B, T)
        h = F.embedding(local.clamp(0, self.num_embeddings - 1), self.weight)
        h = h * inside[..., None].to(h.dtype)  # (B, T, dim)
        dist.all_reduce(h)
        return h


class Received(nn.Module):
    """In place of the embeddings on a later pipeline rank: the previous rank's activations."""

    def __init__(self, dim: int, src: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.dim, self.src, self.dtype = dim, src, dtype

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = torch.empty(*tokens.shape, self.dim, dtype=self.dtype, device=tokens.device)
        dist.recv(h, self.src)
        return h  # (B, T, dim)


class Broadcast(nn.Module):
    """In place of the output projection on an earlier pipeline rank: the last rank's logits."""

    def __init__(self, vocab_size: int, src: int) -> None:
        super().__init__()
        self.vocab_size, self.src = vocab_size, src

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = torch.empty(*h.shape[:-1], self.vocab_size, dtype=h.dtype, device=h.device)
        dist.broadcast(logits, self.src)
        return logits


def stage(model: nn.Module, args: ModelArgs, shard: Shard, dtype: torch.dtype) -> None:
    """Makes a (meta) Transformer one pipeline rank's: its block of layers; receiving instead of
    embedding after the first rank; sending its block's output and receiving the logits before
    the last, whose logits go to every rank. The forward itself is unchanged."""
    layers = stage_layers(args.n_layers, shard)
    model.layers = nn.ModuleList(model.layers[layers.start : layers.stop])
    first, last = shard.rank == 0, shard.rank == shard.world - 1
    if not first:
        model.tok_embeddings = Received(args.dim, shard.rank - 1, dtype)
    if not last:
        dst = shard.rank + 1
        model.layers[-1].register_forward_hook(lambda _m, _i, h: dist.send(h.contiguous(), dst))
        model.norm = nn.Identity()
        model.output = Broadcast(args.vocab_size, shard.world - 1)
    else:
        end = shard.world - 1
        model.output.register_forward_hook(lambda _m, _i, logits: dist.broadcast(logits, end))
