"""Layers whose weights stay codes in PyTorch (mlx-lm's packed codes, FP8 checkpoints' e4m3
bytes), put in place of a built Transformer's Linear and Embedding modules by name, from outside
the forward: a layer unpacks and dequantizes its weight where it runs, a block of rows at a time
(bit for bit mx.dequantize, as mistral/quant.py computes it; FP8 as mistral/fp8.py does), so a
4-bit model holds about a quarter of its bfloat16 bytes and an FP8 one half."""

from __future__ import annotations

import functools
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from backends.torch.model import Linear, Router
from mistral.errors import MistralError
from mistral.fp8 import E4M3, E4M3_MAX, FP8Tensor
from mistral.quant import FP4, Quantization, QuantizedTensor
from mistral.weights import RawTensor, release


def unpack(words: torch.Tensor, bits: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """(..., W) int32 holding uint32 words -> (..., W * 32 / bits) codes, least significant
    bits first (the words are little-endian), written to ``out`` where it is given (any dtype:
    the codes are small integers), else uint8. A code a pass, by scalar shifts and masks of the
    words' bytes: a tensor of shifts broadcast over them ran several times slower on a CPU, and
    a gather of words (3, 5, 6 bits) ten times slower."""
    mask = (1 << bits) - 1
    octets = words.view(torch.uint8)  # (..., 4W)
    # 8 / bits codes in every byte for 2, 4 and 8 bits; for 3, 5 and 6, 8 codes in every `bits`
    # bytes, some across two (3 bits: code 2 is bits 6..7 of byte 0 and bit 0 of byte 1)
    span, per = (1, 8 // bits) if 8 % bits == 0 else (bits, 8)
    groups = octets.unflatten(-1, (-1, span))  # (..., 4W / span, span)
    codes = []  # code j of each group
    for j in range(per):
        k, r = divmod(j * bits, 8)  # code j starts at bit r of the group's byte k
        byte = groups[..., k]
        if r + bits > 8:  # the high part from the next byte
            codes.append((byte >> r) | (groups[..., k + 1] << (8 - r)).bitwise_and_(mask))
        elif r + bits == 8:  # the byte's top code: nothing above it to mask
            codes.append(byte >> r if r else byte)  # 8 bits: the byte itself
        else:
            codes.append((byte >> r if r else byte) & mask)
    if out is None:  # functional, as inductor fuses it into one kernel
        return torch.stack(codes, dim=-1).flatten(-2)
    into = out.view(*groups.shape[:-1], per)
    for j, code in enumerate(codes):
        into[..., j].copy_(code)  # copy_: an out= that is not contiguous breaks torch.compile
    return into.flatten(-2)


@functools.cache
def values_of(kind: str, device: torch.device) -> torch.Tensor:
    """The float32 value of every code of ``kind`` ("e4m3": 256, "e2m1": 16), made once."""
    return torch.from_numpy(E4M3 if kind == "e4m3" else FP4).to(device)


def subnormals_kept() -> bool:
    """Whether float32 products here keep subnormals (torch.set_flush_denormal(True) flushes
    them, and E4M3's subnormals pass through float32's on e4m3_values' fast path)."""
    return torch.tensor([1], dtype=torch.int32).view(torch.float32).mul_(2.0**120).item() != 0


def e4m3_values(codes: torch.Tensor, finite: bool = False) -> torch.Tensor:
    """uint8 E4M3 codes -> their float32 values: torch's own cast (equal to the table on every
    code, tested); MPS has no float8: the table. ``finite``, where no code is NaN (0x7F, 0xFF):
    on a CPU the bits moved to bfloat16's places, the exponent's bias 127 where E4M3's is 7, so
    times 2^120 (subnormals too, unless they are flushed), exact and three times faster than
    torch's cast there."""
    if codes.device.type == "mps":
        return values_of("e4m3", codes.device)[codes.int()]
    compiling = torch.compiler.is_compiling()  # inductor writes its own cast; .item() would break
    if finite and codes.device.type == "cpu" and not compiling and subnormals_kept():
        bits = codes.to(torch.int16)  # s eeee mmm -> s 0000eeee mmm0000, in place
        sign = (bits & 0x80).bitwise_left_shift_(8)
        bits.bitwise_and_(0x7F).bitwise_left_shift_(4).bitwise_or_(sign)
        return bits.view(torch.bfloat16).float().mul_(2.0**120)
    return codes.view(torch.float8_e4m3fn).float()


def dequantize(
    codes: torch.Tensor,
    scales: torch.Tensor,
    biases: torch.Tensor | None,
    q: Quantization,
    dtype: torch.dtype,
) -> torch.Tensor:
    """(..., n) codes (affine: of any dtype; the float modes: uint8) with their (..., n /
    group_size) scales (and biases) -> (..., n) in ``dtype``. Affine: code * scale, then + bias,
    each rounded to the dtype as MLX rounds them; the float modes: exact in float32 (a few
    significant bits times a power of two or an E4M3 scale), then rounded."""
    groups = codes.unflatten(-1, (-1, q.group_size))  # (..., n / g, g)
    if biases is not None:
        w = groups.to(dtype)  # in place from here (codes already in the dtype: in them)
        return w.mul_(scales[..., None].to(dtype)).add_(biases[..., None].to(dtype)).flatten(-2)
    if q.mode == "mxfp8":
        values = e4m3_values(groups)  # float32
    else:  # a lookup: uint8 comparisons and torch.where ran slower on this CPU than the table
        values = values_of("e2m1", codes.device)[groups.int()]
    if q.mode == "nvfp4":
        scale = e4m3_values(scales)
    else:  # a uint8 exponent e: 2^(e - 127), as float32 bits; e = 0 is 2^-127, subnormal
        e = scales.to(torch.int32)
        scale = torch.where(e == 0, 1 << 22, e << 23).view(torch.float32)
    return values.mul_(scale[..., None]).flatten(-2).to(dtype)


ELEMENTS_AT_ONCE = 1 << 21  # weights dequantized at once, in blocks of rows: 4 MiB in bfloat16


class QuantizedLinear(nn.Module):
    """x @ W.T with W held as codes, scales and biases, dequantized at each call."""

    def __init__(
        self,
        codes: torch.Tensor,  # (out, in * bits / 32) int32 holding the uint32 words
        scales: torch.Tensor,
        biases: torch.Tensor | None,
        q: Quantization,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.q, self.dtype = q, dtype
        # Not in the state dict: the checkpoint's names hold the weight these stand for.
        self.register_buffer("codes", codes, persistent=False)
        self.register_buffer("scales", scales, persistent=False)
        self.register_buffer("biases", biases, persistent=False)

    @classmethod
    def of(cls, t: QuantizedTensor, dtype: torch.dtype, device: torch.device) -> QuantizedLinear:
        codes = from_raw(t.packed).view(torch.int32)  # the uint32 words' bits
        biases = None if t.biases is None else from_raw(t.biases).to(device)
        return cls(codes.to(device), from_raw(t.scales).to(device), biases, t.q, dtype)

    def weight_of(
        self, rows: torch.Tensor | slice = slice(None), out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The dequantized weight's ``rows``, (out, in) for all of them; in ``out``, a buffer of
        that shape in the dtype, where it is given."""
        biases = None if self.biases is None else self.biases[rows]
        into = out if self.biases is not None else None  # the float modes index by the codes
        codes = unpack(self.codes[rows], self.q.bits, into)
        w = dequantize(codes, self.scales[rows], biases, self.q, self.dtype)
        return out.copy_(w) if out is not None and into is None else w  # affine: in out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """In blocks of output rows, so that only a block is ever dequantized at once. Eager,
        each into one buffer, so that the heap is not left with a hole the size of each block;
        compiled, functionally: inductor plans the memory and fuses each block's unpacking and
        dequantization (fed from a buffer, it ran at a third of that speed on a CPU)."""
        n, k = len(self.codes), x.shape[-1]
        step = min(n, max(1, ELEMENTS_AT_ONCE // k))
        buffer = None
        if not torch.compiler.is_compiling():
            buffer = torch.empty(step, k, dtype=self.dtype, device=x.device)
        pieces = []
        for i in range(0, n, step):
            rows = slice(i, min(i + step, n))
            into = None if buffer is None else buffer[: rows.stop - i]
            pieces.append(F.linear(x, self.weight_of(rows, into)))
        return torch.cat(pieces, dim=-1)


class FP8Linear(QuantizedLinear):
    """x @ W.T with W held as e4m3 codes and a float32 scale per block (Hugging Face's and
    Mistral's FP8 checkpoints). By default dequantized at each call as FP8Tensor.dequantized
    computes it: each code's value times its block's scale in float32, rounded once to the dtype.
    ``scaled``: multiplied in FP8 instead (scaled_product). The scales are kept per row (out,
    blocks across): rows reordered (HF's wq/wk) keep their own."""

    @classmethod
    def of(
        cls, t: FP8Tensor, dtype: torch.dtype, device: torch.device, scaled: bool = False
    ) -> FP8Linear:
        codes, scales = (torch.from_numpy(a).to(device) for a in t.by_row())
        layer = cls(codes, scales, None, None, dtype)
        layer.width = min(t.block[1], t.shape[1])  # inputs per block (all: one scale a row)
        layer.act_scale, layer.scaled = t.act_scale, scaled
        layer.finite = not bool(((codes & 0x7F) == 0x7F).any())  # no NaN code (e4m3_values)
        if scaled:  # each block's scales in a row of their own, as _scaled_mm takes them
            layer.register_buffer("block_scales", layer.scales.T.contiguous(), persistent=False)
        return layer

    def weight_of(
        self, rows: torch.Tensor | slice = slice(None), out: torch.Tensor | None = None
    ) -> torch.Tensor:
        values = e4m3_values(self.codes[rows], self.finite)  # (out, in) float32
        n, scales = values.shape[-1], self.scales[rows]
        if n % self.width == 0:  # whole blocks: each scale broadcast over its block
            blocks = values.unflatten(-1, (scales.shape[-1], -1))  # (out, in / width, width)
            blocks.mul_(scales[..., None])
        else:  # the last block ragged
            values.mul_(scales.repeat_interleave(self.width, dim=-1)[..., :n])
        return values.to(self.dtype) if out is None else out.copy_(values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.scaled:
            return super().forward(x)
        rows = x.flatten(0, -2)  # (M, in)
        y = scaled_product(rows, self.codes, self.block_scales, self.width, self.act_scale)
        return y.to(x.dtype).unflatten(0, x.shape[:-1])


def activation_codes(x: torch.Tensor, act_scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, k) activations -> their e4m3 codes (M, k) and float32 scales (M, 1): x / s rounded to
    the nearest e4m3 value, s the static scale where there is one, else each row's largest |x|
    (at least 1e-10) / 448, as vLLM's and transformers' FP8 kernels quantize."""
    x = x.float()
    if act_scale is None:
        s = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-10) / E4M3_MAX
    else:
        s = x.new_full((len(x), 1), act_scale)
    return (x / s).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), s


def scaled_product(
    x: torch.Tensor,
    codes: torch.Tensor,
    block_scales: torch.Tensor,
    width: int,
    act_scale: float | None,
) -> torch.Tensor:
    """(M, n) activations times (out, n) uint8 e4m3 codes with their (ceil(n / width), out)
    scales -> (M, out) float32, multiplied in FP8 (torch._scaled_mm: an FP8 product with float32
    sums, on CUDA GPUs of compute capability 8.9 and up, and the CPU): the activations quantized
    per block of ``width`` inputs (activation_codes), each block's float32 sums scaled by both
    scales, the blocks summed in float32 (DeepSeek-V3's FP8 GEMM). The product takes unit scales
    and the scales are applied after it: a float32 output takes per-row scales only on Hopper
    with cuBLAS 12.9 or later."""
    weight, one = codes.view(torch.float8_e4m3fn), unit(x.device)
    y = None
    for i, start in enumerate(range(0, x.shape[-1], width)):
        a, s = activation_codes(x[:, start : start + width], act_scale)
        w = weight[:, start : start + width].t()  # (width, out), column-major as it must be
        part = torch._scaled_mm(a, w, scale_a=one, scale_b=one, out_dtype=torch.float32)
        part = part * s * block_scales[i][None]  # (M, out)
        y = part if y is None else y + part
    assert y is not None
    return y


@functools.cache
def unit(device: torch.device) -> torch.Tensor:
    """A float32 1 on ``device``: a tensor-wise scale that scales nothing."""
    return torch.ones((), device=device)


def check_fp8_shape(name: str, t: FP8Tensor, device: torch.device) -> None:
    """Refuses, in one line, a weight CUDA's FP8 products cannot take: each block of inputs
    (the last, ragged one too) and the output a multiple of 16 (CUDA's; the CPU takes any)."""
    out, n = t.shape
    width = min(t.block[1], n)
    if device.type == "cuda" and (out % 16 or width % 16 or n % width % 16):
        raise MistralError(
            f"fp8 scaled: {name} is {out} x {n} in blocks of {width} inputs; CUDA's FP8 "
            "products need multiples of 16 (use --fp8 keep)"
        )


class QuantizedEmbedding(QuantizedLinear):
    """Rows of a quantized table, dequantized as they are looked up."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight_of(ids)  # (B, T, dim)


def check_fp8_products(device: torch.device) -> None:
    """Refuses, in one line, a device without FP8 products (CUDA before compute capability 8.9,
    MPS): one tiny product tried there."""
    try:
        x, codes = torch.ones(16, 32, device=device), torch.ones(16, 32, dtype=torch.uint8)
        scaled_product(x, codes.to(device), torch.ones(1, 16, device=device), 32, None).sum().item()
    except (RuntimeError, TypeError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MistralError(
            f"fp8 scaled: no FP8 products on {device} ({reason}); they need a CUDA GPU of compute "
            "capability 8.9 or later, or the CPU"
        ) from None


def from_raw(t: RawTensor) -> torch.Tensor:
    """A writable copy of one (possibly memory-mapped) tensor; its file pages given back."""
    data = np.array(t.data)
    release(t.source)
    if t.dtype == "bfloat16":
        return torch.from_numpy(data.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(data)


def kept_as_codes(name: str, module: nn.Module | None) -> bool:
    """Whether a quantized weight stays codes: a plain projection or the embedding table. The
    others are dequantized at load: a MoE gate (small, its bias beside it), latent attention's
    wkv_b (the absorbed decode reads the weight itself), a pipeline rank's stand-ins."""
    projection = isinstance(module, Linear) and not isinstance(module, Router)
    return (projection or isinstance(module, nn.Embedding)) and not name.endswith("wkv_b")


def quantize_modules(
    model: nn.Module,
    tensors: Mapping[str, QuantizedTensor | FP8Tensor],
    tied: bool,
    dtype: torch.dtype,
    device: torch.device,
    fp8: str = "keep",
) -> set[str]:
    """Each module whose weight is one of ``tensors`` and stays codes (kept_as_codes) becomes
    its quantized twin (the output projection of tied embeddings shares the table's codes; FP8
    weights: FP8Linear, multiplying in FP8 when ``fp8`` is "scaled", none when it is "dequantize");
    the names of the weights they took."""
    if fp8 == "scaled":
        check_fp8_products(device)
    modules = dict(model.named_modules())
    taken = set()
    for key, t in tensors.items():
        path = key.removesuffix(".weight")
        if not kept_as_codes(path, modules.get(path)):
            continue
        *parents, name = path.split(".")
        if isinstance(t, FP8Tensor):  # a projection's (a float8 table is dequantized at load)
            if name == "tok_embeddings" or fp8 == "dequantize":
                continue
            if fp8 == "scaled":
                check_fp8_shape(key, t, device)
            module: QuantizedLinear = FP8Linear.of(t, dtype, device, fp8 == "scaled")
        else:
            twin = QuantizedEmbedding if name == "tok_embeddings" else QuantizedLinear
            module = twin.of(t, dtype, device)
        setattr(model.get_submodule(".".join(parents)), name, module)
        taken.add(key)
        shared = tied and kept_as_codes("output", model.output)  # the table's codes, twice
        if isinstance(module, QuantizedEmbedding) and shared:
            model.output = QuantizedLinear(
                module.codes, module.scales, module.biases, module.q, dtype
            )
            taken.add("output.weight")
    return taken
