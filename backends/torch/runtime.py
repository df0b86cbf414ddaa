"""The small surface mistral/ calls: build a Transformer from raw tensors, run one planned step."""

from __future__ import annotations

import functools
import platform
import time
import warnings
from collections.abc import Callable, Mapping

import numpy as np
import torch

from backends.torch.cache import RotatingCache, Step
from backends.torch.model import Linear, MoeLayer, Transformer
from mistral.args import ModelArgs
from mistral.backend import cpu_cache_bytes, cpu_copy_bandwidth
from mistral.cache import StepPlan, plan_prefill
from mistral.errors import MistralError
from mistral.rope import inv_frequencies
from mistral.taps import as_row
from mistral.weights import RawTensor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | None) -> torch.device:
    """ "cpu", "cuda", "cuda:N" or "mps"; None picks CUDA, then MPS, then the CPU."""
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise MistralError(
            f"unknown torch device {device!r}: use cpu, cuda, cuda:N or mps"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MistralError(f"device {device!r} is not available: this torch sees no CUDA GPU")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            n = torch.cuda.device_count()
            raise MistralError(f"device {device!r} is not available: {n} CUDA GPU(s) present")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise MistralError(f"device {device!r} is not available on this machine")
    elif dev.type != "cpu":
        raise MistralError(f"unsupported torch device {device!r}: use cpu, cuda, cuda:N or mps")
    return dev


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """None picks bfloat16 on CUDA that supports it, float16 on MPS, float32 on the CPU."""
    if dtype is None:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device.type == "mps" else torch.float32
    if dtype not in DTYPES:
        raise MistralError(f"unknown dtype {dtype!r}: use {', '.join(DTYPES)}")
    if device.type == "cuda" and dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise MistralError(f"bfloat16 is not supported by {torch.cuda.get_device_name(device)}")
    return DTYPES[dtype]


def check_runs(device: torch.device, dtype: torch.dtype) -> None:
    """Refuses, in one line, a dtype the device cannot compute in (bfloat16 on older MPS, say)."""
    try:
        x = torch.ones(2, 4, device=device, dtype=dtype)
        torch.nn.functional.linear(x, x).sum().item()
    except (RuntimeError, TypeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        name = str(dtype).removeprefix("torch.")
        raise MistralError(f"dtype {name} cannot run on {device} ({reason})") from None


def to_torch(t: RawTensor) -> torch.Tensor:
    data = np.array(t.data)  # a writable copy of one (possibly memory-mapped) tensor
    if t.dtype == "bfloat16":
        return torch.from_numpy(data.view(np.int16)).view(torch.bfloat16).reshape(t.shape)
    return torch.from_numpy(data).reshape(t.shape)


class TorchRunner:
    """A Transformer on one device and dtype, run step by step through a RotatingCache."""

    backend = "torch"

    def __init__(
        self,
        args: ModelArgs,
        model: Transformer,
        device: torch.device,
        dtype: torch.dtype,
        compile: bool = False,
    ) -> None:
        self.args = args
        self.model = model
        # Decode steps have static shapes (keys = the whole buffer): compiled once, and on CUDA
        # replayed as a CUDA graph ("reduce-overhead"). Prefill stays eager.
        self.decode_model = model
        if compile:
            mode = "reduce-overhead" if device.type == "cuda" else "default"
            self.decode_model = torch.compile(model, mode=mode, dynamic=False)
        self.torch_device = device
        self.torch_dtype = dtype
        self.device = str(device)
        self.dtype = str(dtype).removeprefix("torch.")
        self.inv_freq = torch.from_numpy(inv_frequencies(args.head_dim, args.rope_theta)).to(device)

    def new_cache(self, batch: int, size: int) -> RotatingCache:
        a = self.args
        return RotatingCache(
            a.n_layers, batch, size, a.n_kv_heads, a.head_dim, self.torch_dtype, self.torch_device
        )

    @torch.inference_mode()
    def forward(
        self, tokens: np.ndarray, plan: StepPlan, cache: RotatingCache, last_only: bool
    ) -> np.ndarray:
        """(B, T) token ids -> float32 logits, (B, T, V), or (B, V) at each row's last new token."""
        step = Step.from_plan(plan, self.inv_freq)
        x = torch.from_numpy(tokens).to(self.torch_device)
        last = None
        if last_only:
            last = torch.from_numpy(plan.last_index).to(self.torch_device)
        model = self.decode_model if plan.keys == "cache" else self.model
        out = model(x, cache, step, last)
        out = out[:, 0] if last_only else out
        return out.cpu().numpy()

    @property
    def products(self) -> str:
        """What the Linear layers multiply with (see linear_kernel)."""
        return "F.linear" if self.model.output.kernel is None else "oneDNN inner product"

    def memory_probe(self) -> DeviceMemory:
        return DeviceMemory(self.torch_device)

    def copy_bandwidth(self) -> float:
        return copy_bandwidth(self.torch_device)

    def matmul_throughput(self) -> float:
        return matmul_throughput(self.torch_device, self.torch_dtype, self.model.output.kernel)

    @torch.inference_mode()
    def trace(self, tokens: list[int]) -> dict[str, np.ndarray]:
        """One uncached forward of one row with every tap recorded, as float32 numpy (T, ...)."""
        plan, size = plan_prefill(len(tokens), self.args.sliding_window)
        step = Step.from_plan(plan, self.inv_freq)
        step.taps = {}
        x = torch.tensor([tokens], device=self.torch_device)
        step.tap(None, "logits", self.model(x, self.new_cache(1, size), step))
        return {
            name: as_row(name, t.float().cpu().numpy(), len(tokens))
            for name, t in step.taps.items()
        }


class DeviceMemory:
    """Peak device memory on CUDA; on CPUs (and MPS, which keeps no peak) the caller samples RSS."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.on_device = device.type == "cuda"

    def reset(self) -> None:
        if self.on_device:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        return int(torch.cuda.max_memory_allocated(self.device)) if self.on_device else 0

    def current(self) -> int:
        return int(torch.cuda.memory_allocated(self.device)) if self.on_device else 0


def memory_probe(device: str | None) -> DeviceMemory:
    """The probe for a device before any model is built there (to read what is held already)."""
    return DeviceMemory(resolve_device(device))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def copy_bandwidth(device: torch.device, nbytes: int = 256 * 2**20) -> float:
    """Bytes/s of a large device-to-device copy (it reads and writes every byte), best of 5; on a
    CPU the machine's figure, the same for every framework (mistral.backend.cpu_copy_bandwidth)."""
    if device.type == "cpu":
        return cpu_copy_bandwidth(nbytes)
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(6):
        synchronize(device)
        start = time.perf_counter()
        y.copy_(x)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


def matmul_throughput(
    device: torch.device, dtype: torch.dtype, kernel: Callable | None, n: int | None = None
) -> float:
    """FLOP/s of an n x n by n x n product in dtype, multiplied as the Linear layers multiply
    (kernel, or F.linear), best of 5; n is 8192 on GPUs and 1024 on CPUs."""
    n = n or (1024 if device.type == "cpu" else 8192)
    x = torch.randn(n, n, device=device).to(dtype)
    w = torch.randn(n, n, device=device).to(dtype)
    product = kernel or torch.nn.functional.linear
    best = float("inf")
    with torch.inference_mode():
        for _ in range(6):
            synchronize(device)
            start = time.perf_counter()
            product(x, w)
            synchronize(device)
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def build(
    args: ModelArgs,
    tensors: Mapping[str, RawTensor],
    device: str | None,
    dtype: str | None,
    compile: bool = False,
) -> TorchRunner:
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    check_runs(dev, dt)
    with torch.device("meta"):
        model = Transformer(args)
    state = {k: to_torch(t).to(dev, dt) for k, t in tensors.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    kernel = linear_kernel(dev, dt, sum(m.weight.nbytes for m in linears))
    for module in linears:
        module.kernel = kernel
    if compile:  # the compiled decode step gathers experts instead of looping with host syncs
        stack_experts(model)
    return TorchRunner(args, model, dev, dt, compile)


def inner_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T by oneDNN's inner product (the op torch.compile's CPU weight packing emits)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


@functools.cache
def onednn_linear() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """inner_product, called directly in eager mode; under torch.compile through the op
    mistral::onednn_linear (registered the first time this is asked for), which inductor calls as
    is: it lowers the mkldnn op only for weights it has frozen into constants. Eager mode skips the
    custom op, whose dispatch made a decode step 6 percent slower (small-bench, interleaved A/B)."""

    @torch.library.custom_op("mistral::onednn_linear", mutates_args=())
    def opaque(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return inner_product(x, weight)

    @opaque.register_fake
    def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x.new_empty((*x.shape[:-1], weight.shape[0]))  # (..., out)

    def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return opaque(x, weight) if torch.compiler.is_compiling() else inner_product(x, weight)

    return linear


def linear_kernel(device: torch.device, dtype: torch.dtype, weight_bytes: int) -> Callable | None:
    """The product the Linear layers (weight_bytes in all) use here, or None for F.linear.

    On x86 CPUs torch gives float32 F.linear to MKL, whose products run far below the memory
    bandwidth on AMD processors: measured on a 2-core EPYC, one row times a 32000x512 matrix
    16 GB/s (MKL) against 34 GB/s (oneDNN), and 128 rows 2.3x faster too. So float32 on an x86 CPU
    goes to oneDNN when the weights outgrow the last-level cache; the results differ from MKL's by
    summation order only (about 1e-6 relative). Weights that fit in the cache are read from it, and
    there MKL's lower cost per call wins (the embedded model decodes 1.75x faster with it). In
    bfloat16 F.linear was the faster (0.9 against 1.2 ms), and oneDNN has no float16 CPU product:
    half precision, and every other device, keep F.linear."""
    if device.type != "cpu" or dtype != torch.float32 or weight_bytes <= cpu_cache_bytes():
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        x = torch.ones(2, 3, 4)
        if not torch.equal(onednn_linear()(x, x[0]), x @ x[0].T):
            return None
    except (AttributeError, RuntimeError):  # a build without the op
        return None
    return onednn_linear()


def stack_experts(model: Transformer) -> None:
    """Gives every MoE layer its experts' weights stacked, (E, out, in); each expert's own
    parameter becomes a view of the stack, so the names stay and the memory is not doubled."""
    for block in model.layers:
        moe = block.feed_forward
        if not isinstance(moe, MoeLayer):
            continue
        stacked = []
        for name in ("w1", "w2", "w3"):
            w = torch.stack([getattr(e, name).weight for e in moe.experts])
            for i, e in enumerate(moe.experts):
                getattr(e, name).weight = torch.nn.Parameter(w[i], requires_grad=False)
            stacked.append(w)
        moe.stacked = tuple(stacked)


def read_pth(path: str) -> dict[str, RawTensor]:
    """A consolidated.00.pth as RawTensors: weights_only (no pickle code runs) and memory-mapped."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MistralError(f"{path}: not a plain tensor checkpoint ({first})") from None
    if not isinstance(state, dict):
        raise MistralError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    out = {}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise MistralError(f"{path}: {name} is a {type(t).__name__}, not a tensor")
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype == "bfloat16":
            data = t.view(torch.int16).numpy().view(np.uint16)
        elif dtype in ("float32", "float16"):
            data = t.numpy()
        else:
            raise MistralError(f"{path}: {name} has unsupported dtype {dtype}")
        out[name] = RawTensor(dtype, tuple(t.shape), data.reshape(-1))
    return out
