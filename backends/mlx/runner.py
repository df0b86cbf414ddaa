"""The MLX backend's Runner (mistral.contract): a Transformer built from raw tensors, one
planned step at a time."""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Iterator, Mapping

import mlx.core as mx
import numpy as np

from backends.mlx.cache import LayerCache, Step
from backends.mlx.kernels import SplitRows, cpu_streams, own_thread_streams, stack_experts
from backends.mlx.model import Linear, MoeLayer, Transformer
from backends.mlx.parallel import (
    AllSummed,
    Broadcast,
    Received,
    VocabEmbedding,
    connect,
    gathered,
    join,
    reduced,
    share,
    stage,
)
from backends.mlx.quantized import arrays, quantize_modules, read_whole
from mistral.args import ModelArgs
from mistral.cache import StepPlan, Window, plan_prefill
from mistral.errors import MistralError
from mistral.parallel import REDUCED, Shard, rank_share, vocab_rows
from mistral.rope import Rope
from mistral.taps import as_row
from mistral.weights import FLOAT32_KEYS, RawTensor, linear_bytes, release

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


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


def dtype_name(dtype: mx.Dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def check_runs(device: mx.Device, dtype: mx.Dtype) -> None:
    """Refuses, in one line, a dtype the device cannot compute in."""
    try:
        with mx.stream(device):
            x = mx.ones((2, 4), dtype=dtype)
            mx.eval((x @ x.T).sum())
    except (RuntimeError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MistralError(f"dtype {dtype_name(dtype)} cannot run on {device} ({reason})") from None


def from_raw(t: RawTensor) -> mx.array:
    data = np.ascontiguousarray(t.data)  # one (possibly memory-mapped) tensor
    a = mx.array(data).view(mx.bfloat16) if t.dtype == "bfloat16" else mx.array(data)
    release(t.source)  # its file pages, copied
    return a


def gpu_available() -> bool:
    return bool(mx.is_available(mx.gpu))


class Runner:
    """A Transformer on one device and dtype, run step by step through its layers' caches."""

    def __init__(
        self,
        args: ModelArgs,
        model: Transformer,
        device: mx.Device,
        dtype: mx.Dtype,
        group: mx.distributed.Group | None = None,
    ) -> None:
        self.args = args
        self.group = group  # parallel ranks: the group share() speaks over
        self.model = model
        self.mx_device = device
        self.mx_dtype = dtype
        self.device = "gpu" if device == mx.gpu else "cpu"
        self.dtype = dtype_name(dtype)
        self.rope = Rope.of(args)
        self.freqs = mx.array(1.0 / self.rope.inv_freq)
        self.taps: dict[str, mx.array] | None = None  # set while recording()

    def new_cache(self, batch: int, sizes: Mapping[Window, int]) -> list[LayerCache]:
        with mx.stream(self.mx_device):
            return self.model.new_cache(batch, dict(sizes), self.mx_dtype)

    def forward(
        self,
        tokens: np.ndarray,
        plans: Mapping[Window, StepPlan],
        cache: list[LayerCache] | None,
        last_only: bool,
    ) -> np.ndarray:
        """(B, T) token ids -> float32 logits, (B, T, V), or (B, V) at each row's last new token."""
        own_thread_streams()
        with mx.stream(self.mx_device):
            steps = {w: Step.from_plan(plan, self.rope, self.freqs) for w, plan in plans.items()}
            x = mx.array(tokens.astype(np.int32))
            last = None
            if last_only:  # the same in every window's plan
                last = mx.array(next(iter(plans.values())).last_index.astype(np.int32))
            out = self.model(x, steps, cache, last)
            out = out[:, 0] if last_only else out
            # One evaluation per step: the logits and every layer's cache writes together.
            mx.eval(out, [(c.k, c.v) for c in cache or []])
        return np.array(out)

    def share(self, data: bytes) -> bytes:
        """Rank 0's bytes on every parallel rank; one process: the bytes."""
        return data if self.group is None else share(data, self.group)

    def trace(self, tokens: list[int]) -> dict[str, np.ndarray]:
        """One uncached forward of one row with every tap recorded, as float32 numpy (T, ...)."""
        plans = plan_prefill([len(tokens)], self.args.layer_windows())
        with self.recording() as taps:
            self.forward(np.array([tokens]), plans, None, last_only=False)
        return taps

    @contextlib.contextmanager
    def recording(self) -> Iterator[dict[str, np.ndarray]]:
        """The forwards run inside record every named tap of row 0: the dict given is filled,
        float32 numpy (T, ...), as the block ends."""
        self.taps, out = {}, {}
        for recorder in self.model.recorders():
            recorder.store = self.taps
        try:
            yield out
        finally:
            for recorder in self.model.recorders():
                recorder.store = None
            taps, self.taps = self.taps, None
        with mx.stream(self.mx_device):
            taps = {name: t.astype(mx.float32) for name, t in taps.items()}
            mx.eval(taps)
        length = taps["embeddings"].shape[1]
        out |= {name: as_row(name, np.array(t), length) for name, t in taps.items()}


def build(
    args: ModelArgs,
    tensors: Mapping[str, RawTensor],
    device: str | None,
    dtype: str | None,
    compile: bool = False,
    parallel: str | None = None,
    fp8: str = "keep",
) -> Runner:
    if compile:
        raise MistralError("compile is an option of the torch backend (torch.compile, CUDA graphs)")
    own_thread_streams()
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    check_runs(dev, dt)
    local, shard, pipeline, group = args, None, None, None
    if parallel is not None:
        rank, group = join()
        local, tensors = rank_share(args, tensors, parallel, rank)
        shard, pipeline = (rank, None) if parallel == "tensor" else (None, rank)
    model = Transformer(local)  # MLX is lazy: the initial parameters are never materialized
    if shard is not None:  # its rows of the vocabulary
        rows = vocab_rows(args.vocab_size, shard)
        model.tok_embeddings = VocabEmbedding(rows, args.dim, group)
    if pipeline is not None:
        stage(model, args, pipeline, dt, group)
    tensors = read_whole(tensors, dtype_name(dt))  # wkv_b's codes, dequantized
    taken = quantize_modules(model, tensors, args.tied_embeddings, dt, dev, fp8)  # kept as codes
    state = {}
    for k, t in tensors.items():  # quantized weights: their codes, scales and biases
        state |= arrays(k, t, mx.float32 if k.endswith(FLOAT32_KEYS) else dt, from_raw, taken)
    if args.tied_embeddings and not isinstance(model.output, Broadcast):  # one table, two uses
        state |= {k.replace("tok_embeddings", "output"): v for k, v in state.items() if "tok_" in k}
    if isinstance(model.tok_embeddings, Received):  # a later pipeline rank's
        state = {k: v for k, v in state.items() if not k.startswith("tok_embeddings.")}
    model.load_weights(list(state.items()), strict=True)
    mx.eval(model.parameters())
    stack_experts(model, dev, dt)  # MoE layers multiply by the chosen experts only, no host sync
    streams = cpu_streams(dev, linear_bytes(local, dt.size))
    for name, module in model.named_modules():
        if isinstance(module, Linear):  # a share of the inputs: summed over the ranks
            kernel = SplitRows(module.weight, streams) if streams else None
            module.kernel = reduced(kernel, group) if shard and name.endswith(REDUCED) else kernel
        if shard and name == "output":  # its rows of the vocabulary: the logits gathered
            per = len(vocab_rows(args.vocab_size, Shard(0, shard.world)))
            module.kernel = gathered(module.kernel, group, args.vocab_size, per)
    if pipeline is not None:
        connect(model, pipeline, group)
    for block in model.layers if shard else []:  # a MoE layer's partial sums, summed once
        if isinstance(block.feed_forward, MoeLayer):
            block.feed_forward = AllSummed(block.feed_forward, group)
    return Runner(args, model, dev, dt, group)
