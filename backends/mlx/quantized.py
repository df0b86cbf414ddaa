"""Layers whose weights stay affine codes (mlx-lm's quantized folders), put in place of a built
Transformer's Linear and Embedding modules by name, from outside the forward."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import mlx.core as mx
import mlx.nn as nn

from backends.mlx.model import Linear, Router
from mistral.fp8 import FP8Tensor
from mistral.quant import Quantization, QuantizedTensor
from mistral.weights import RawTensor


class QuantizedLinear(nn.Module):
    """x @ W.T with W as codes, scales and biases (mx.quantized_matmul, as mlx-lm multiplies).

    ``accumulate``: the dtype the product runs in. MLX 0.32's CPU kernel sums a row's products
    in the activations' dtype, so half precision there multiplies in float32 (the embedded
    model at 4 bits kept the float32 argmax on 95.8% of its positions in bfloat16, 99+% so)."""

    def __init__(
        self, t: QuantizedTensor, dtype: mx.Dtype, accumulate: mx.Dtype | None = None
    ) -> None:
        super().__init__()
        self.q: Quantization = t.q
        self.dtype = dtype  # of what it computes
        self.accumulate = accumulate or dtype
        # Placeholders of the stored shapes (MLX is lazy: never computed), set by load_weights.
        self.weight = mx.zeros(t.packed.shape, dtype=mx.uint32)
        self.scales = mx.zeros(t.scales.shape, dtype=mx.uint8 if t.biases is None else dtype)
        if t.biases is not None:  # affine; mxfp4 has none
            self.biases = mx.zeros(t.biases.shape)

    def __call__(self, x: mx.array) -> mx.array:
        q, a = self.q, self.accumulate
        biases = self.get("biases")
        scales = self.scales if biases is None else self.scales.astype(a)  # float modes: uint8
        biases = None if biases is None else biases.astype(a)
        y = mx.quantized_matmul(
            x.astype(a), self.weight, scales, biases, True, q.group_size, q.bits, mode=q.mode
        )
        return y.astype(x.dtype)


class QuantizedRouter(QuantizedLinear):
    """A quantized MoE gate, with DeepSeek-V3's per-expert bias when its scores are sigmoids."""

    def __init__(self, t: QuantizedTensor, dtype: mx.Dtype, biased: bool, accumulate=None) -> None:
        super().__init__(t, dtype, accumulate)
        self.e_score_correction_bias = mx.zeros((t.shape[0],)) if biased else None


class QuantizedEmbedding(QuantizedLinear):
    """Rows of a quantized table, dequantized as they are looked up."""

    def __call__(self, ids: mx.array) -> mx.array:
        q, biases = self.q, self.get("biases")
        return mx.dequantize(
            self.weight[ids],
            self.scales[ids],
            None if biases is None else biases[ids],
            group_size=q.group_size,
            bits=q.bits,
            mode=q.mode,
            dtype=self.dtype,
        )


def read_whole(
    tensors: Mapping[str, RawTensor | QuantizedTensor], dtype: str
) -> dict[str, RawTensor | QuantizedTensor]:
    """The tensors, a quantized wkv_b dequantized in ``dtype``: the absorbed decode of latent
    attention reads that weight itself."""
    wkv_b = "attention.wkv_b.weight"
    return {
        k: t.dequantized(dtype) if k.endswith(wkv_b) and isinstance(t, QuantizedTensor) else t
        for k, t in tensors.items()
    }


def quantize_modules(
    model: nn.Module,
    tensors: Mapping[str, RawTensor | QuantizedTensor],
    tied: bool,
    dtype: mx.Dtype,
    device: mx.Device,
) -> None:
    """Each module whose weight is a QuantizedTensor becomes its quantized twin (the embedding
    table, and the output projection of tied embeddings with it); on the CPU their products
    run in float32 (QuantizedLinear)."""
    accumulate = mx.float32 if device == mx.cpu else dtype
    quantized = {k.removesuffix(".weight"): t for k, t in tensors.items() if is_q(t)}
    if tied and "tok_embeddings" in quantized:
        quantized["output"] = quantized["tok_embeddings"]
    # a pipeline rank's stand-ins (received activations, broadcast logits) stay as they are
    if not isinstance(model.tok_embeddings, nn.Embedding):
        quantized.pop("tok_embeddings", None)
    if not isinstance(model.output, Linear):
        quantized.pop("output", None)
    for path, t in quantized.items():
        *parents, name = path.split(".")
        owner = model
        for p in parents:
            owner = owner[int(p)] if p.isdigit() else getattr(owner, p)
        if name == "tok_embeddings":
            setattr(owner, name, QuantizedEmbedding(t, dtype))
        elif isinstance(getattr(owner, name), Router):  # a MoE gate keeps its bias, if any
            biased = getattr(owner, name).e_score_correction_bias is not None
            setattr(owner, name, QuantizedRouter(t, dtype, biased, accumulate))
        else:
            setattr(owner, name, QuantizedLinear(t, dtype, accumulate))


def arrays(
    name: str, t: RawTensor | QuantizedTensor, dtype: mx.Dtype, from_raw: Callable
) -> dict[str, mx.array]:
    """The module's arrays of one tensor: a weight in the run's dtype, or codes as they are
    with their scales and biases in the run's dtype."""
    if isinstance(t, FP8Tensor):  # FP8 checkpoints: dequantized at load, as torch does
        t = t.dequantized("float32")
    if not isinstance(t, QuantizedTensor):
        return {name: from_raw(t).astype(dtype)}
    module = name.removesuffix(".weight")
    if t.biases is None:  # mxfp4: the scales are exponents and stay so
        return {name: from_raw(t.packed), f"{module}.scales": from_raw(t.scales)}
    return {
        name: from_raw(t.packed),
        f"{module}.scales": from_raw(t.scales).astype(dtype),
        f"{module}.biases": from_raw(t.biases).astype(dtype),
    }


def is_q(t: RawTensor | QuantizedTensor) -> bool:
    return isinstance(t, QuantizedTensor)
