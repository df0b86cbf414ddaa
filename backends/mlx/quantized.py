"""Layers whose weights stay codes (mlx-lm's quantized folders; FP8 checkpoints' e4m3 bytes), put
in place of a built Transformer's Linear and Embedding modules by name, from outside the forward."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Set

import mlx.core as mx
import mlx.nn as nn

from backends.mlx.model import Linear, Router
from mistral.fp8 import E4M3_MAX, FP8Tensor
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


ELEMENTS_AT_ONCE = 1 << 21  # FP8 weights dequantized at once, in blocks of rows (as torch's)


class FP8Linear(nn.Module):
    """x @ W.T with W held as e4m3 codes and a float32 scale per block, kept per row (rows
    reordered, HF's wq/wk, keep their own), dequantized at each call as FP8Tensor.dequantized
    computes it: each code's value times its block's scale in float32, rounded once to the
    dtype; a block of rows at a time. ``scaled``: the FP8 product of torch's --fp8 scaled,
    emulated (scaled_product)."""

    def __init__(self, t: FP8Tensor, dtype: mx.Dtype, scaled: bool = False) -> None:
        super().__init__()
        self.dtype, self.width = dtype, min(t.block[1], t.shape[1])
        self.act_scale, self.scaled = t.act_scale, scaled
        # Placeholders of the stored shapes (MLX is lazy: never computed), set by load_weights.
        self.weight = mx.zeros(t.shape, dtype=mx.uint8)
        self.scales = mx.zeros((t.shape[0], t.scale_inv.shape[1]))  # (out, blocks across)

    def weight_of(self, rows: slice) -> mx.array:
        values = mx.from_fp8(self.weight[rows], mx.float32)  # (rows, in): E4M3's values
        scales, (r, n) = self.scales[rows], values.shape
        if n % self.width == 0:  # whole blocks: each scale broadcast over its block
            blocks = values.reshape(r, -1, self.width) * scales[..., None]
            return blocks.reshape(r, n).astype(self.dtype)
        scales = mx.repeat(scales, self.width, axis=-1)[:, :n]  # the last block ragged
        return (values * scales).astype(self.dtype)

    def __call__(self, x: mx.array) -> mx.array:
        if self.scaled:
            return self.scaled_product(x)
        n, step = self.weight.shape[0], max(1, ELEMENTS_AT_ONCE // self.weight.shape[1])
        blocks = [slice(i, min(i + step, n)) for i in range(0, n, step)]
        return mx.concatenate([x @ self.weight_of(rows).T for rows in blocks], axis=-1)

    def scaled_product(self, x: mx.array) -> mx.array:
        """torch's FP8 product (backends/torch/quantized.py scaled_product) in float32
        arithmetic, MLX having none: per block of inputs, the activations rounded to e4m3 by
        the static scale or by max(|x|, 1e-10) / 448 per row (mx.to_fp8 rounds as torch's cast
        does, tested), the e4m3 values' products summed in float32, times both scales."""
        rows = x.reshape(-1, x.shape[-1]).astype(mx.float32)  # (M, in)
        y = mx.zeros((rows.shape[0], self.weight.shape[0]))
        for i, start in enumerate(range(0, rows.shape[-1], self.width)):
            block = rows[:, start : start + self.width]
            if self.act_scale is None:
                s = mx.maximum(mx.abs(block).max(axis=-1, keepdims=True), 1e-10) / E4M3_MAX
            else:
                s = mx.full((rows.shape[0], 1), self.act_scale)
            a = mx.from_fp8(mx.to_fp8(mx.clip(block / s, -E4M3_MAX, E4M3_MAX)), mx.float32)
            w = mx.from_fp8(self.weight[:, start : start + self.width], mx.float32)
            y = y + (a @ w.T) * s * self.scales[:, i]  # (M, out)
        return y.astype(x.dtype).reshape(*x.shape[:-1], -1)


def read_whole(
    tensors: Mapping[str, RawTensor | QuantizedTensor], dtype: str
) -> dict[str, RawTensor | QuantizedTensor]:
    """The tensors, a quantized or FP8 wkv_b dequantized in ``dtype``: the absorbed decode of
    latent attention reads that weight itself."""
    wkv_b, coded = "attention.wkv_b.weight", QuantizedTensor | FP8Tensor
    return {
        k: t.dequantized(dtype) if k.endswith(wkv_b) and isinstance(t, coded) else t
        for k, t in tensors.items()
    }


def quantize_modules(
    model: nn.Module,
    tensors: Mapping[str, RawTensor | QuantizedTensor],
    tied: bool,
    dtype: mx.Dtype,
    device: mx.Device,
    fp8: str = "keep",
) -> set[str]:
    """Each module whose weight is a QuantizedTensor becomes its quantized twin (the embedding
    table, and the output projection of tied embeddings with it); on the CPU their products
    run in float32 (QuantizedLinear). A projection's FP8 weight: FP8Linear (its FP8 product
    emulated when ``fp8`` is "scaled"), unless ``fp8`` is "dequantize" (the others are
    dequantized at load, as torch's). The names of the FP8 weights kept as codes."""
    taken = set()
    for key, t in tensors.items() if fp8 != "dequantize" else ():
        path = key.removesuffix(".weight")
        module = get_module(model, path) if isinstance(t, FP8Tensor) else None
        if isinstance(module, Linear) and not isinstance(module, Router):
            set_module(model, path, FP8Linear(t, dtype, fp8 == "scaled"))
            taken.add(key)
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
        module = get_module(model, path)
        if path == "tok_embeddings":
            set_module(model, path, QuantizedEmbedding(t, dtype))
        elif isinstance(module, Router):  # a MoE gate keeps its bias, if any
            biased = module.e_score_correction_bias is not None
            set_module(model, path, QuantizedRouter(t, dtype, biased, accumulate))
        else:
            set_module(model, path, QuantizedLinear(t, dtype, accumulate))
    return taken


def get_module(model: nn.Module, path: str) -> nn.Module | None:
    """The module at a dotted path ("layers.0.attention.wq"), None where there is none."""
    owner = model
    for p in path.split("."):
        if p.isdigit() and isinstance(owner, list) and int(p) < len(owner):
            owner = owner[int(p)]
        elif isinstance(owner, nn.Module) and p in owner:
            owner = owner[p]
        else:
            return None
    return owner


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    *parents, name = path.split(".")
    owner = get_module(model, ".".join(parents)) if parents else model
    setattr(owner, name, module)


def arrays(
    name: str,
    t: RawTensor | QuantizedTensor,
    dtype: mx.Dtype,
    from_raw: Callable,
    taken: Set[str] = frozenset(),
) -> dict[str, mx.array]:
    """The module's arrays of one tensor: a weight in the run's dtype, or codes as they are
    with their scales and biases in the run's dtype; FP8 codes (rows in their order) with each
    row's float32 scales where ``taken`` (quantize_modules) kept them, else dequantized."""
    if isinstance(t, FP8Tensor) and name in taken:
        codes, scales = t.by_row()
        return {name: mx.array(codes), name.removesuffix(".weight") + ".scales": mx.array(scales)}
    if isinstance(t, FP8Tensor):  # the others dequantized at load, as torch's
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
