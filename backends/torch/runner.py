"""The torch backend's Runner (mistral.contract): a Transformer built from raw tensors, one
planned step at a time."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import numpy as np
import torch
import torch.distributed as dist

from backends.torch.cache import LayerCache, Step
from backends.torch.kernels import linear_kernel, stack_experts
from backends.torch.model import Linear, MoeLayer, Transformer
from backends.torch.parallel import (
    Broadcast,
    Received,
    VocabEmbedding,
    gathered,
    join,
    peer_lost,
    reduce_output,
    reduced,
    share,
    stage,
)
from backends.torch.quantized import QuantizedLinear, from_raw, quantize_modules
from mistral.args import ModelArgs
from mistral.cache import StepPlan, Window, plan_prefill
from mistral.errors import MistralError
from mistral.fp8 import FP8Tensor
from mistral.parallel import REDUCED, Shard, rank_share, vocab_rows
from mistral.quant import QuantizedTensor
from mistral.rope import Rope
from mistral.taps import as_row
from mistral.weights import FLOAT32_KEYS, RawTensor, linear_bytes

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | None) -> torch.device:
    """ "cpu", "cuda", "cuda:N" or "mps"; None picks CUDA, then MPS, then the CPU."""
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
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


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def check_runs(device: torch.device, dtype: torch.dtype) -> None:
    """Refuses, in one line, a dtype the device cannot compute in (bfloat16 on older MPS, say)."""
    try:
        x = torch.ones(2, 4, device=device, dtype=dtype)
        torch.nn.functional.linear(x, x).sum().item()
    except (RuntimeError, TypeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MistralError(f"dtype {dtype_name(dtype)} cannot run on {device} ({reason})") from None


def dequantized(t: RawTensor | QuantizedTensor | FP8Tensor, dtype: str) -> RawTensor:
    return t.dequantized(dtype) if isinstance(t, QuantizedTensor | FP8Tensor) else t


class Runner:
    """A Transformer on one device and dtype, run step by step through its layers' caches."""

    def __init__(
        self,
        args: ModelArgs,
        model: Transformer,
        device: torch.device,
        dtype: torch.dtype,
        host: dist.ProcessGroup | None = None,
    ) -> None:
        self.args = args
        self.host = host  # parallel ranks: the group share() speaks over
        self.model = model
        self.decode_model = model  # the model of decode steps (compiled, where asked for)
        self.torch_device = device
        self.torch_dtype = dtype
        self.device = str(device)
        self.dtype = dtype_name(dtype)
        self.rope = Rope.of(args)
        self.inv_freq = torch.from_numpy(self.rope.inv_freq).to(device)
        self.taps: dict[str, torch.Tensor] | None = None  # set while recording()

    def new_cache(self, batch: int, sizes: Mapping[Window, int]) -> list[LayerCache]:
        with torch.device(self.torch_device):
            return self.model.new_cache(batch, dict(sizes), self.torch_dtype)

    @torch.inference_mode()
    def forward(
        self,
        tokens: np.ndarray,
        plans: Mapping[Window, StepPlan],
        cache: list[LayerCache] | None,
        last_only: bool,
    ) -> np.ndarray:
        """(B, T) token ids -> float32 logits, (B, T, V), or (B, V) at each row's last new token."""
        steps = {w: Step.from_plan(plan, self.rope, self.inv_freq) for w, plan in plans.items()}
        x = torch.from_numpy(tokens).to(self.torch_device)
        last = None
        if last_only:  # the same in every window's plan
            last = torch.from_numpy(next(iter(plans.values())).last_index).to(self.torch_device)
        decode = all(plan.key_layout == "cache" for plan in plans.values())
        compiled = decode and self.taps is None  # a recorded step runs eager
        try:
            out = (self.decode_model if compiled else self.model)(x, steps, cache, last)
        except RuntimeError as e:  # parallel ranks: a peer that ended is named in one line
            lost = peer_lost(e)
            if lost is None:
                raise
            raise lost from None
        out = out[:, 0] if last_only else out
        return out.cpu().numpy()

    def share(self, data: bytes) -> bytes:
        """Rank 0's bytes on every parallel rank; one process: the bytes."""
        return data if self.host is None else share(data, self.host)

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
        length = taps["embeddings"].shape[1]
        out |= {name: as_row(name, t.float().cpu().numpy(), length) for name, t in taps.items()}


@contextlib.contextmanager
def without_initial_weights() -> Iterator[None]:
    """Modules built without drawing their initial weights, which the checkpoint's replace: on
    the meta device the draws would also import torch._dynamo (1.4 s of every start here)."""
    names = ("normal_", "uniform_", "kaiming_uniform_")
    saved = {name: getattr(torch.nn.init, name) for name in names}
    for name in names:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, draw in saved.items():
            setattr(torch.nn.init, name, draw)


def build(
    args: ModelArgs,
    tensors: Mapping[str, RawTensor],
    device: str | None,
    dtype: str | None,
    compile: bool = False,
    parallel: str | None = None,
    fp8: str = "keep",
) -> Runner:
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    check_runs(dev, dt)
    local, shard, pipeline, host = args, None, None, None
    if parallel is not None:
        if compile:
            raise MistralError("compile and parallel ranks do not go together yet")
        rank, dev, host = join(dev)
        local, tensors = rank_share(args, tensors, parallel, rank)
        shard, pipeline = (rank, None) if parallel == "tensor" else (None, rank)
    with torch.device("meta"), without_initial_weights():
        model = Transformer(local)
        if shard is not None:  # its rows of the vocabulary
            model.tok_embeddings = VocabEmbedding(vocab_rows(args.vocab_size, shard), args.dim)
    if pipeline is not None:
        stage(model, args, pipeline, dt)
    codes = {k: t for k, t in tensors.items() if isinstance(t, QuantizedTensor | FP8Tensor)}
    taken = quantize_modules(model, codes, args.tied_embeddings, dt, dev, fp8)  # kept as codes
    state = {}
    for k, t in tensors.items():  # other quantized weights: dequantized in the run's dtype
        kept = torch.float32 if k.endswith(FLOAT32_KEYS) else dt
        if k not in taken:
            state[k] = from_raw(dequantized(t, dtype_name(dt))).to(dev, kept)
    if args.tied_embeddings and not isinstance(model.output, Broadcast | QuantizedLinear):
        state["output.weight"] = state["tok_embeddings.weight"]  # one table, two uses
    if isinstance(model.tok_embeddings, Received):  # a later pipeline rank's
        state.pop("tok_embeddings.weight", None)
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()
    if compile:  # MoE layers of the compiled step multiply by the chosen experts, no host sync
        stack_experts(model)
    kernel = linear_kernel(dev, dt, linear_bytes(local, dt.itemsize))
    for name, module in model.named_modules():
        if isinstance(module, Linear):  # a share of the inputs: summed over the ranks
            module.kernel = reduced(kernel) if shard and name.endswith(REDUCED) else kernel
        if shard and name == "output":  # its rows of the vocabulary: the logits gathered
            per = len(vocab_rows(args.vocab_size, Shard(0, shard.world)))
            module.kernel = gathered(kernel, args.vocab_size, per)
        if shard and isinstance(module, MoeLayer):  # its experts' partial sums, summed once
            module.register_forward_hook(reduce_output)
    runner = Runner(args, model, dev, dt, host)
    if compile:
        # Decode steps have static shapes (keys = the whole buffer): compiled once, and on CUDA
        # replayed as a CUDA graph ("reduce-overhead"). Prefill stays eager.
        mode = "reduce-overhead" if dev.type == "cuda" else "default"
        runner.decode_model = torch.compile(model, mode=mode, dynamic=False)
    return runner
