"""Products and expert layouts suited to the device, applied to a built Transformer from outside
(its parameter names and shapes unchanged), and the care MLX's per-thread streams need."""

from __future__ import annotations

import platform
import threading
from collections.abc import Callable

import mlx.core as mx

from backends.mlx.model import Linear, MoeLayer, Transformer
from backends.mlx.quantized import QuantizedLinear
from mistral.measure import cpu_cache_bytes, cpu_cores
from mistral.quant import Quantization


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


def runs(product: Callable[[], mx.array], device: mx.Device) -> bool:
    """Whether a small product of the kind runs here (MLX 0.32's CPU gather_mm is float32 only)."""
    try:
        with mx.stream(device):
            mx.eval(product())
        return True
    except (RuntimeError, ValueError):
        return False


def gathered(w: mx.array) -> Callable[[mx.array, mx.array], mx.array]:
    """(N, 1, 1, in), the chosen (N, k) -> (N, k, 1, out): times the chosen experts' weights
    of the stack w, (E, out, in)."""
    w = w.swapaxes(-1, -2)  # (E, in, out)
    return lambda x, chosen: mx.gather_mm(x, w, rhs_indices=chosen)


def gathered_codes(
    codes: mx.array, scales: mx.array, biases: mx.array | None, q: Quantization, a: mx.Dtype
) -> Callable[[mx.array, mx.array], mx.array]:
    """As gathered, the stacked experts held as codes, (E, out, in * bits / 32), the product
    run in ``a`` (QuantizedLinear.accumulate)."""

    def product(x: mx.array, chosen: mx.array) -> mx.array:
        s, b = (scales, None) if biases is None else (scales.astype(a), biases.astype(a))
        return mx.gather_qmm(
            x.astype(a),
            codes,
            s,
            b,
            rhs_indices=chosen,
            transpose=True,
            group_size=q.group_size,
            bits=q.bits,
            mode=q.mode,
        ).astype(x.dtype)  # fmt: skip  (the float modes' scales: uint8 exponents, as they are)

    return product


def stack_experts(model: Transformer, device: mx.Device, dtype: mx.Dtype) -> None:
    """Gives every MoE layer its experts' w1, w2, w3 stacked, (E, out, in), as products of the
    chosen experts only (mx.gather_mm; mx.gather_qmm for experts held as codes, one
    quantization for all), where they run here; the others loop over their tokens."""
    for block in model.layers:
        moe = block.feed_forward
        if not isinstance(moe, MoeLayer):
            continue
        products = [expert_product([getattr(e, n) for e in moe.experts], device, dtype) for n in W]
        if all(products):
            # A plain attribute: Module.__setattr__ would register a tuple as a child.
            object.__setattr__(moe, "stacked", tuple(products))


W = ("w1", "w2", "w3")


def expert_product(layers: list, device: mx.Device, dtype: mx.Dtype) -> Callable | None:
    """The gathered product of one projection's experts, stacked; None where they differ in
    kind or it does not run here. Each expert's own arrays become lazy slices of the stack that
    inference never evaluates, so the checkpoint's names stay and the experts are held once."""
    first = layers[0]
    if all(isinstance(m, Linear) for m in layers):
        names, dim = ("weight",), first.weight.shape[-1]
    elif all(isinstance(m, QuantizedLinear) and m.q == first.q for m in layers):
        names = tuple(a for a in ("weight", "scales", "biases") if a in first)
        dim = first.weight.shape[-1] * 32 // first.q.bits
    else:
        return None
    stacks = {a: mx.stack([m[a] for m in layers]) for a in names}
    if len(names) == 1:
        product = gathered(stacks["weight"])
    else:
        parts = (stacks["weight"], stacks["scales"], stacks.get("biases"))
        product = gathered_codes(*parts, first.q, first.accumulate)
    x = mx.zeros((1, 1, 1, dim), dtype=dtype)
    if not runs(lambda: product(x, mx.zeros((1, 1), mx.uint32)), device):
        return None
    mx.eval(stacks)
    for i, m in enumerate(layers):
        for a, stack in stacks.items():
            m[a] = stack[i]
    return product


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
