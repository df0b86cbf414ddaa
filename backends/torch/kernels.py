"""Products and expert layouts suited to the device, applied to a built Transformer from outside
(its parameter names and shapes unchanged)."""

from __future__ import annotations

import functools
import platform
from collections.abc import Callable

import torch

from backends.torch.model import Linear, MoeLayer, Transformer
from mistral.measure import cpu_cache_bytes


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
    parameter becomes a view of the stack, so the names stay and the memory is not doubled.
    Experts kept as codes (backends/torch/quantized.py) are left to loop over their tokens."""
    for block in model.layers:
        moe = block.feed_forward
        if not isinstance(moe, MoeLayer) or not isinstance(moe.experts[0].w1, Linear):
            continue
        stacked = []
        for name in ("w1", "w2", "w3"):
            w = torch.stack([getattr(e, name).weight for e in moe.experts])
            for i, e in enumerate(moe.experts):
                getattr(e, name).weight = torch.nn.Parameter(w[i], requires_grad=False)
            stacked.append(w)
        moe.stacked = tuple(stacked)
