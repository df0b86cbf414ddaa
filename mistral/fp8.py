"""FP8 weights as Hugging Face's block-quantized checkpoints store them (DeepSeek-V3, Mistral
Large 3, Devstral 2): float8 e4m3 codes and a float32 inverse scale per block of 128 x 128
(``quantization_config``: quant_method fp8, weight_block_size), read as codes beside their
scales (a backend keeps or dequantizes them: contract.FP8_MODES); and as
Mistral's own folders do (Mistral Small 4: params.json ``quantization`` {qformat_weight:
fp8_e4m3, qscheme_act: TENSOR}, one ``qscale_weight`` per weight and a static ``qscale_act``
for its inputs). Dequantized weights multiply the activations as they are, as transformers'
conversion to bfloat16 does; FP8 products (``--fp8 scaled``) quantize them too, as
vLLM's and transformers' FP8 kernels do: by the static scale where the folder has one, else per
row and block of inputs (the weight's block width, or the whole row), ``s = max(|x|, 1e-10) /
448``; then ``y = sum over input blocks of (e4m3(x / s) . codes) * s * scale_inv``.

E4M3 (the "fn" variant: no infinities): sign, 4 exponent bits with bias 7, 3 mantissa bits;
exponent 0 is subnormal (2^-6 * m / 8), S.1111.111 is NaN, the largest value 448. A weight is
``e4m3(code) * scale_inv[row // 128, col // 128]`` in float32, then the run's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from mistral.errors import MistralError
from mistral.weights import RawTensor, from_numpy, release


def e4m3_table() -> np.ndarray:
    """(256,) float32: the value of every e4m3 byte."""
    b = np.arange(256)
    sign = np.where(b >> 7, -1.0, 1.0)
    exponent, mantissa = (b >> 3) & 0xF, b & 0x7
    normal = (1 + mantissa / 8) * 2.0 ** (exponent - 7)
    values = sign * np.where(exponent == 0, mantissa / 8 * 2.0**-6, normal)
    values[(b & 0x7F) == 0x7F] = np.nan
    return values.astype(np.float32)


E4M3 = e4m3_table()
E4M3_MAX = 448.0  # its largest finite value (code 0x7E)


@dataclass(frozen=True)
class FP8Tensor:
    """A weight as e4m3 codes with an inverse scale per block; ``rows`` reorders its rows after
    dequantizing (HF's wq/wk: a reordered row would leave its block)."""

    codes: RawTensor  # "float8_e4m3" (its bytes), (out, in)
    scale_inv: RawTensor  # float32, (ceil(out / block[0]), ceil(in / block[1]))
    block: tuple[int, int]
    rows: np.ndarray | None = None
    act_scale: float | None = None  # the static scale of its inputs, where the folder has one

    @property
    def shape(self) -> tuple[int, ...]:
        return self.codes.shape

    @property
    def dtype(self) -> str:
        return "bfloat16"  # what the checkpoints' other tensors are

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scale_inv.nbytes

    def reorder_rows(self, order: np.ndarray) -> FP8Tensor:
        return replace(self, rows=order if self.rows is None else self.rows[order])

    def by_row(self) -> tuple[np.ndarray, np.ndarray]:
        """The codes as a backend keeps them: (out, in) uint8 in their rows' order, and each
        row's float32 scales (out, ceil(in / block)), so that reordered rows keep their own;
        copies, the file pages given back."""
        rows = np.arange(self.shape[0]) if self.rows is None else self.rows
        codes = np.ascontiguousarray(np.asarray(self.codes.data)[rows]).view(np.uint8)
        scales = self.scale_inv.to_numpy().astype(np.float32)[rows // self.block[0]]
        release(self.codes.source, self.scale_inv.source)
        return codes, scales

    def dequantized(self, dtype: str | None = None) -> RawTensor:
        """The weight in ``dtype`` (default bfloat16): codes times their block's scale in
        float32, rounded once to the dtype."""
        out, n = self.shape
        bo, bi = self.block
        scale = self.scale_inv.to_numpy().astype(np.float32)
        scale = np.repeat(np.repeat(scale, bo, axis=0)[:out], bi, axis=1)[:, :n]
        w = E4M3[self.codes.data] * scale
        return from_numpy(w if self.rows is None else w[self.rows], dtype or self.dtype)


def fp8_block(config: Any, source: str) -> tuple[int, int] | None:
    """The block size of a config's ``quantization_config`` of quant_method fp8, else None.
    Static activation scales (Mistral Small 4's folders) are read beside their weights, for FP8
    products; dequantized weights multiply the activations as they are."""
    if not isinstance(config, dict) or config.get("quant_method") != "fp8":
        return None
    if config.get("activation_scheme", "dynamic") not in ("dynamic", "static"):
        raise MistralError(f"{source}: fp8 activation_scheme must be dynamic or static")
    block = config.get("weight_block_size") or [None, None]
    if not (
        isinstance(block, list)
        and len(block) == 2
        and all(b is None or (type(b) is int and b > 0) for b in block)
    ):
        raise MistralError(f"{source}: weight_block_size must be two positive integers")
    return block[0] or 1 << 62, block[1] or 1 << 62  # none: one scale for the whole weight


# A weight's scales as each layout names them beside its module: (the weight's, its inputs')
HF_SCALES = (".weight_scale_inv", ".activation_scale")
MISTRAL_SCALES = (".qscale_weight", ".qscale_act")


def gather_fp8(
    tensors: dict[str, RawTensor],
    block: tuple[int, int],
    source: str,
    names: tuple[str, str] = HF_SCALES,
) -> dict[str, Any]:
    """Each e4m3 ``<module>.weight`` with its scale (``names``: Hugging Face's
    ``.weight_scale_inv``, or Mistral's ``.qscale_weight``) as one FP8Tensor, checked; static
    activation scales (``.activation_scale``, ``.qscale_act``) checked and kept beside it."""
    scales, inputs = names
    out: dict[str, Any] = {}
    acts: dict[str, float] = {}
    for name, t in tensors.items():
        if name.endswith(inputs):
            weight = name.removesuffix(inputs) + ".weight"
            if weight not in tensors or tensors[weight].dtype != "float8_e4m3":
                raise MistralError(f"{source}: {name} scales the inputs of no float8 weight")
            if t.shape not in ((), (1,)) or t.dtype not in ("float32", "bfloat16"):
                raise MistralError(f"{source}: {name} is {t.dtype} {t.shape}, not one float")
            acts[weight] = float(t.to_numpy().reshape(-1)[0])
            if not 0 < acts[weight] < np.inf:
                raise MistralError(f"{source}: {name} is {acts[weight]}, not a positive scale")
            continue
        if name.endswith(scales):
            weight = name.removesuffix(scales) + ".weight"
            if weight not in tensors or tensors[weight].dtype != "float8_e4m3":
                raise MistralError(f"{source}: {name} scales no float8 weight")
            continue
        if t.dtype != "float8_e4m3":
            out[name] = t
            continue
        scale, b = tensors.get(name.removesuffix(".weight") + scales), block
        if scale is not None and scale.shape in ((), (1,)):  # one scale for the whole weight
            scale, b = RawTensor(scale.dtype, scale.data.reshape(1, 1)), (1 << 62, 1 << 62)
        if scale is None or len(t.shape) != 2 or scale.dtype not in ("float32", "bfloat16"):
            raise MistralError(f"{source}: {name} is float8 without its float {scales[1:]}")
        bo, bi = min(b[0], t.shape[0]), min(b[1], t.shape[1])
        want = (-(-t.shape[0] // bo), -(-t.shape[1] // bi))
        if tuple(scale.shape) != want:
            raise MistralError(f"{source}: {name}'s scales {scale.shape} are not {want} blocks")
        out[name] = FP8Tensor(t, scale, (bo, bi))
    return {k: replace(t, act_scale=acts[k]) if k in acts else t for k, t in out.items()}


MISTRAL_FP8 = {"qformat_weight": "fp8_e4m3", "qscheme_act": "TENSOR"}


def mistral_fp8(block: Any, source: str) -> bool:
    """Whether params.json's ``quantization`` block is Mistral's FP8 (refused if anything else)."""
    if block is None:
        return False
    if not isinstance(block, dict) or block.get("qformat_weight") != "fp8_e4m3":
        raise MistralError(f"{source}: quantization {block!r} is not supported (fp8_e4m3)")
    unknown = sorted(set(block) - set(MISTRAL_FP8) - {"qformat_act"})
    if unknown or block.get("qscheme_act", "TENSOR") != "TENSOR":
        raise MistralError(f"{source}: quantization {block!r}: only per-tensor fp8_e4m3 is read")
    return True


def gather_mistral_fp8(tensors: dict[str, RawTensor], source: str) -> dict[str, Any]:
    """Mistral's per-tensor FP8: one ``.qscale_weight`` per weight, a ``.qscale_act``."""
    return gather_fp8(tensors, (1 << 62, 1 << 62), source, MISTRAL_SCALES)
