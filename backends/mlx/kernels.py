"""Products and expert layouts suited to the device, applied to a built Transformer from outside
(its parameter names and shapes unchanged), and the care MLX's per-thread streams need."""

from __future__ import annotations

import platform
import threading

import mlx.core as mx

from backends.mlx.model import Linear, MoeLayer, Transformer
from mistral.measure import cpu_cache_bytes, cpu_cores


class SplitRows:
    """x @ weight.T with weight's rows cut into one block per CPU stream, the blocks computed at
    once and joined. Each output is computed as the whole product would compute it: same bits.
    The blocks are views of the weight, cut at the first call (no copy) and kept."""

    def __init__(self, weight: mx.array, streams: list[mx.Stream]) -> None:
        self.weight = weight
        self.streams = streams
        self.blocks: list[mx.array] = []

    def __call__(self, x: mx.array, weight: mx.array) -> mx.array:
        n = len(self.streams)
        if weight is not self.weight or weight.shape[0] < n:
            return x @ weight.T  # a weight replaced since, or too few rows to share
        if not self.blocks:
            cuts = [weight.shape[0] * i // n for i in range(n + 1)]
            self.blocks = [weight[cuts[i] : cuts[i + 1]].T for i in range(n)]
        parts = [mx.matmul(x, b, stream=s) for b, s in zip(self.blocks, self.streams, strict=True)]
        return mx.concatenate(parts, axis=-1)


def cpu_streams(device: mx.Device, weight_bytes: int) -> list[mx.Stream]:
    """The CPU streams the Linear layers (weight_bytes in all) share their products across, one
    per core; none where the products need no help.

    MLX runs each CPU stream on one thread, and mlx[cpu] on Linux does its products with a
    single-threaded BLAS (measured on a 2-core EPYC: one row times a 32000x512 matrix at 8.7 GB/s,
    one fifth of the memory bandwidth). Cut across one stream per core, a product uses every core:
    decode 1.3x and prefill 1.7x faster on that machine. Weights that fit in the last-level cache
    are read from it, and there the cost of joining the streams loses (the embedded model decodes
    1.25x faster without). On a Mac the CPU products go to Accelerate, which spreads them itself,
    and the GPU needs no help: both keep nn.Linear."""
    if device != mx.cpu or platform.system() == "Darwin" or weight_bytes <= cpu_cache_bytes():
        return []
    cores = cpu_cores()
    return [mx.new_stream(mx.cpu) for _ in range(cores)] if cores > 1 else []


def gathers(device: mx.Device, dtype: mx.Dtype) -> bool:
    """Whether mx.gather_mm runs here in this dtype (MLX 0.32's CPU kernel is float32 only)."""
    try:
        with mx.stream(device):
            w = mx.ones((2, 4, 4), dtype=dtype)
            mx.eval(
                mx.gather_mm(mx.ones((1, 1, 1, 4), dtype=dtype), w, rhs_indices=mx.array([[1]]))
            )
        return True
    except (RuntimeError, ValueError):
        return False


def stack_experts(model: Transformer) -> None:
    """Gives every MoE layer its experts' weights stacked, (E, out, in), for mx.gather_mm.

    Each expert's own weight becomes a lazy slice of the stack that inference never evaluates,
    so the checkpoint's names stay and the experts are held once, not twice."""
    for block in model.layers:
        moe = block.feed_forward
        if not isinstance(moe, MoeLayer):
            continue
        if not all(isinstance(e.w1, Linear) for e in moe.experts):  # quantized: they loop
            continue
        stacked = []
        for name in ("w1", "w2", "w3"):
            w = mx.stack([getattr(e, name).weight for e in moe.experts])
            mx.eval(w)
            for i, e in enumerate(moe.experts):
                getattr(e, name).weight = w[i]
            stacked.append(w)
        # A plain attribute, not a parameter: Module.__setattr__ would register a tuple of arrays.
        object.__setattr__(moe, "stacked", tuple(stacked))


class StreamsOfThisThread:
    """MLX gives each thread its own streams; one left behind by a thread that has ended aborts
    the interpreter at exit ("terminate called without an active exception", about half the
    runs that used MLX from worker threads here). Held in a thread-local, it is dropped by the
    thread as it ends, and waits for and destroys that thread's streams there."""

    def __del__(self) -> None:
        mx.synchronize()
        mx.clear_streams()


LOCAL = threading.local()


def own_thread_streams() -> None:
    """Called where MLX work starts: a thread other than the main one cleans up as it ends."""
    if threading.current_thread() is not threading.main_thread() and not hasattr(LOCAL, "guard"):
        LOCAL.guard = StreamsOfThisThread()
