"""The small surface mistral/ calls: build a Transformer from raw tensors, run one planned step."""

from __future__ import annotations

import platform
import time
from collections.abc import Mapping

import mlx.core as mx
import numpy as np

from backends.mlx.cache import RotatingCache, Step
from backends.mlx.model import Linear, MoeLayer, Transformer
from mistral.args import ModelArgs
from mistral.backend import cpu_cache_bytes, cpu_copy_bandwidth, cpu_cores
from mistral.cache import StepPlan, plan_prefill
from mistral.errors import MistralError
from mistral.rope import inv_frequencies
from mistral.taps import as_row
from mistral.weights import RawTensor

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def gpu_available() -> bool:
    return bool(mx.is_available(mx.gpu))


def resolve_device(device: str | None) -> mx.Device:
    """'gpu' (Metal on a Mac, CUDA with mlx[cuda] on Linux) or 'cpu'; None: the GPU if any."""
    if device is None:
        return mx.gpu if gpu_available() else mx.cpu
    if device == "cpu":
        return mx.cpu
    if device == "gpu":
        if not gpu_available():
            how = "Metal" if platform.system() == "Darwin" else "pip install 'mlx[cuda]'"
            raise MistralError(f"device 'gpu' is not available to MLX here ({how})")
        return mx.gpu
    raise MistralError(f"unknown MLX device {device!r}: use gpu or cpu")


def resolve_dtype(dtype: str | None, device: mx.Device) -> mx.Dtype:
    """None picks bfloat16 on the GPU and float32 on the CPU."""
    if dtype is None:
        return mx.bfloat16 if device == mx.gpu else mx.float32
    if dtype not in DTYPES:
        raise MistralError(f"unknown dtype {dtype!r}: use {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_runs(device: mx.Device, dtype: mx.Dtype) -> None:
    """Refuses, in one line, a dtype the device cannot compute in."""
    try:
        with mx.stream(device):
            x = mx.ones((2, 4), dtype=dtype)
            mx.eval((x @ x.T).sum())
    except (RuntimeError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        name = next(k for k, v in DTYPES.items() if v == dtype)
        raise MistralError(f"dtype {name} cannot run on MLX's {device} ({reason})") from None


def to_mlx(t: RawTensor) -> mx.array:
    data = np.ascontiguousarray(t.data).reshape(t.shape)
    if t.dtype == "bfloat16":
        return mx.array(data).view(mx.bfloat16)
    return mx.array(data)


class MlxRunner:
    """A Transformer on one device and dtype, run step by step through a RotatingCache."""

    backend = "mlx"

    def __init__(
        self, args: ModelArgs, model: Transformer, device: mx.Device, dtype: mx.Dtype
    ) -> None:
        self.args = args
        self.model = model
        self.mx_device = device
        self.mx_dtype = dtype
        self.device = "gpu" if device == mx.gpu else "cpu"
        self.dtype = next(k for k, v in DTYPES.items() if v == dtype)
        self.freqs = mx.array(1.0 / inv_frequencies(args.head_dim, args.rope_theta))

    def new_cache(self, batch: int, size: int) -> RotatingCache:
        a = self.args
        return RotatingCache(a.n_layers, batch, size, a.n_kv_heads, a.head_dim, self.mx_dtype)

    def forward(
        self, tokens: np.ndarray, plan: StepPlan, cache: RotatingCache, last_only: bool
    ) -> np.ndarray:
        """(B, T) token ids -> float32 logits, (B, T, V), or (B, V) at each row's last new token."""
        with mx.stream(self.mx_device):
            step = Step.from_plan(plan, self.freqs)
            x = mx.array(tokens.astype(np.int32))
            last = None
            if last_only:
                last = mx.array(plan.last_index.astype(np.int32))
            out = self.model(x, cache, step, last)
            out = out[:, 0] if last_only else out
            # One evaluation per step: the logits and every layer's cache writes together.
            mx.eval(out, cache.k, cache.v)
        return np.array(out)

    @property
    def products(self) -> str:
        """What the Linear layers multiply with (see cpu_streams)."""
        kernel = self.model.output.kernel
        return "nn.Linear" if kernel is None else f"split over {len(kernel.streams)} CPU streams"

    def memory_probe(self) -> DeviceMemory:
        return DeviceMemory(self.mx_device)

    def copy_bandwidth(self) -> float:
        return copy_bandwidth(self.mx_device)

    def matmul_throughput(self) -> float:
        kernel = self.model.output.kernel
        return matmul_throughput(self.mx_device, self.mx_dtype, kernel.streams if kernel else [])

    def trace(self, tokens: list[int]) -> dict[str, np.ndarray]:
        """One uncached forward of one row with every tap recorded, as float32 numpy (T, ...)."""
        plan, size = plan_prefill(len(tokens), self.args.sliding_window)
        with mx.stream(self.mx_device):
            step = Step.from_plan(plan, self.freqs)
            step.taps = {}
            x = mx.array([tokens])
            step.tap(None, "logits", self.model(x, self.new_cache(1, size), step))
            taps = {name: t.astype(mx.float32) for name, t in step.taps.items()}
            mx.eval(taps)
        return {name: as_row(name, np.array(t), len(tokens)) for name, t in taps.items()}


class DeviceMemory:
    """Peak MLX memory on the GPU; on the CPU the caller samples resident memory instead."""

    def __init__(self, device: mx.Device) -> None:
        self.on_device = device == mx.gpu

    def reset(self) -> None:
        if self.on_device:
            mx.reset_peak_memory()

    def peak(self) -> int:
        return int(mx.get_peak_memory()) if self.on_device else 0

    def current(self) -> int:
        return int(mx.get_active_memory()) if self.on_device else 0


def memory_probe(device: str | None) -> DeviceMemory:
    """The probe for a device before any model is built there (to read what is held already)."""
    return DeviceMemory(resolve_device(device))


def copy_bandwidth(device: mx.Device, nbytes: int = 256 * 2**20) -> float:
    """Bytes/s of a large elementwise pass (it reads and writes every byte), best of 5; on a CPU
    the machine's figure, the same for every framework (mistral.backend.cpu_copy_bandwidth): MLX's
    own CPU pass runs on one thread at a fraction of the memory bandwidth."""
    if device == mx.cpu:
        return cpu_copy_bandwidth(nbytes)
    with mx.stream(device):
        x = mx.ones((nbytes // 4,), dtype=mx.float32)
        mx.eval(x)
        best = float("inf")
        for _ in range(6):
            start = time.perf_counter()
            mx.eval(x + 1.0)
            best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


def matmul_throughput(
    device: mx.Device, dtype: mx.Dtype, streams: list[mx.Stream], n: int | None = None
) -> float:
    """FLOP/s of an n x n by n x n product in dtype, multiplied as the Linear layers multiply
    (split over streams, or x @ w.T), best of 5; n is 8192 on GPUs and 1024 on CPUs."""
    n = n or (1024 if device == mx.cpu else 8192)
    with mx.stream(device):
        x = mx.random.normal((n, n)).astype(dtype)
        w = mx.random.normal((n, n)).astype(dtype)
        mx.eval(x, w)
        product = SplitRows(w, streams) if streams else lambda x, w: x @ w.T
        best = float("inf")
        for _ in range(6):
            start = time.perf_counter()
            mx.eval(product(x, w))
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def build(
    args: ModelArgs,
    tensors: Mapping[str, RawTensor],
    device: str | None,
    dtype: str | None,
    compile: bool = False,
) -> MlxRunner:
    if compile:
        raise MistralError("compile is an option of the torch backend (torch.compile, CUDA graphs)")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    check_runs(dev, dt)
    model = Transformer(args)  # MLX is lazy: the initial parameters are never materialized
    model.load_weights([(k, to_mlx(t).astype(dt)) for k, t in tensors.items()], strict=True)
    mx.eval(model.parameters())
    if gathers(dev, dt):
        stack_experts(model)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    streams = cpu_streams(dev, sum(m.weight.nbytes for m in linears))
    for module in linears:
        module.kernel = SplitRows(module.weight, streams) if streams else None
    return MlxRunner(args, model, dev, dt)


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
        stacked = []
        for name in ("w1", "w2", "w3"):
            w = mx.stack([getattr(e, name).weight for e in moe.experts])
            mx.eval(w)
            for i, e in enumerate(moe.experts):
                getattr(e, name).weight = w[i]
            stacked.append(w)
        # A plain attribute, not a parameter: Module.__setattr__ would register a tuple of arrays.
        object.__setattr__(moe, "stacked", tuple(stacked))
