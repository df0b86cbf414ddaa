"""Affine-quantized weights as mlx-lm writes them, read and dequantized with numpy, bit for bit
as ``mx.dequantize`` computes them.

A quantized ``<name>.weight`` is uint32 ``(out, in * bits / 32)``: each row's codes, ``bits``
wide, packed least significant bits first into little-endian words as one continuous bit stream
(3, 5 and 6 bits cross word boundaries). ``<name>.scales`` and ``<name>.biases`` are
``(out, in / group_size)``, and the weight is ``scale * code + bias`` per group of ``group_size``
inputs, the product and the sum each rounded to the scales' dtype (as MLX computes in it).

E.g. bits 4, group 32, a row of 64 inputs: 8 words (64 * 4 / 32), 2 scales and 2 biases; code j
of the row is bits 4j .. 4j + 3 of the stream, i.e. word j // 8, shifted right by 4 * (j % 8).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from mistral.errors import MistralError
from mistral.fp8 import E4M3, E4M3_MAX
from mistral.weights import RawTensor, cast, from_numpy, nbytes_of

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)


MODES = ("affine", "mxfp4", "mxfp8", "nvfp4")
# The float modes, no biases: (bits, group size). mxfp4's codes are E2M1 values, mxfp8's E4M3,
# both times an E8M0 scale, 2^(s - 127), one uint8 per group; nvfp4's are E2M1 values times an
# E4M3 scale (one uint8 per group of 16).
FLOAT_MODES = {"mxfp4": (4, 32), "mxfp8": (8, 32), "nvfp4": (4, 16)}
FP4 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)


@dataclass(frozen=True)
class Quantization:
    """One layer's: bits per code, inputs per group, and the mode: affine (scale * code + bias)
    or a float mode (mxfp4, mxfp8, nvfp4: a small float times its group's scale, no bias)."""

    bits: int
    group_size: int
    mode: str = "affine"

    def __post_init__(self) -> None:
        if self.mode in FLOAT_MODES:
            bits, group = FLOAT_MODES[self.mode]
            if (self.bits, self.group_size) != (bits, group):
                raise MistralError(f"{self.mode} is {bits} bits in groups of {group}")
        elif self.mode != "affine":
            raise MistralError(f"quantization mode {self.mode!r} is not supported ({MODES})")
        elif self.bits not in BITS or self.group_size not in GROUP_SIZES:
            raise MistralError(
                f"affine quantization of {self.bits} bits in groups of {self.group_size} is not "
                f"supported (bits {BITS}, groups {GROUP_SIZES})"
            )


@dataclass(frozen=True)
class QuantizedTensor:
    """A weight as packed codes with their scales and biases; ``shape`` is the weight's own."""

    packed: RawTensor  # uint32 (out, in * bits / 32)
    scales: RawTensor  # (out, in / group_size): float (affine) or uint8 (the float modes)
    biases: RawTensor | None  # affine only
    q: Quantization

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.packed.shape[0], self.packed.shape[1] * 32 // self.q.bits)

    @property
    def dtype(self) -> str:
        """The dtype it dequantizes to by default (float modes: bfloat16, as mx.dequantize)."""
        return "bfloat16" if self.biases is None else self.scales.dtype

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.packed, self.scales, self.biases) if t is not None)

    def reorder_rows(self, order: np.ndarray) -> QuantizedTensor:
        """Rows (whole output channels, groups and all) in another order, as wq/wk need."""
        biases = None if self.biases is None else self.biases.reorder_rows(order)
        return replace(
            self,
            packed=self.packed.reorder_rows(order),
            scales=self.scales.reorder_rows(order),
            biases=biases,
        )

    def dequantized(self, dtype: str | None = None) -> RawTensor:
        """The weight in ``dtype`` (default: the scales'), computed in it from the scales and
        biases cast to it: bit for bit what mx.dequantize gives on those."""
        dtype = dtype or self.dtype
        return from_numpy(dequantize(self, dtype), dtype)


def unpack(words: np.ndarray, bits: int, n: int) -> np.ndarray:
    """(rows, n * bits / 32) uint32 -> (rows, n) uint32 codes, least significant bits first."""
    raw = np.ascontiguousarray(words, dtype="<u4").view(np.uint8)  # the words' bytes, in order
    stream = np.unpackbits(raw, axis=-1, bitorder="little")[:, : n * bits]
    weights = np.left_shift(np.uint32(1), np.arange(bits, dtype=np.uint32))
    return stream.reshape(len(words), n, bits).astype(np.uint32) @ weights


def rounded(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values rounded to ``dtype`` (bfloat16: to nearest even) and widened back."""
    if dtype == "float32":
        return x
    return from_numpy(x, dtype).to_numpy()


def dequantize(t: QuantizedTensor, dtype: str) -> np.ndarray:
    """(out, in) float32 holding the dequantized weight's values, computed in ``dtype``."""
    out, n = t.shape
    g = t.q.group_size
    codes = unpack(t.packed.data, t.q.bits, n).reshape(out, n // g, g)
    if t.biases is None:  # float modes: exact in float32 (few significant bits times a scale)
        values = E4M3 if t.q.mode == "mxfp8" else FP4
        if t.q.mode == "nvfp4":
            scale = E4M3[t.scales.data][..., None]
        else:
            exponent = t.scales.data.astype(np.int32)[..., None]
            scale = np.where(
                exponent == 0, np.float32(2.0**-127), np.ldexp(np.float32(1), exponent - 127)
            )
        return rounded((values[codes] * scale.astype(np.float32)).reshape(out, n), dtype)
    codes = codes.astype(np.float32)
    scales = rounded(t.scales.to_numpy(), dtype)[..., None]
    biases = rounded(t.biases.to_numpy(), dtype)[..., None]
    w = rounded(rounded(codes * scales, dtype) + biases, dtype)
    return w.reshape(out, n)


def config_quantization(block: Any, source: str) -> tuple[Quantization, dict[str, Any]]:
    """config.json's ``quantization``: the default and the per-layer overrides (a layer's own
    {bits, group_size}, or false: left in full precision), keyed by module path."""
    if not isinstance(block, dict):
        raise MistralError(f"{source}: quantization must be an object, got {block!r}")
    mode = block.get("mode", "affine")
    if mode not in MODES:
        raise MistralError(f"{source}: quantization mode {mode!r} is not supported yet ({MODES})")
    try:
        default = Quantization(block["bits"], block["group_size"], mode)
        layers = {}
        for key, value in block.items():
            if key in ("bits", "group_size", "mode"):
                continue
            if value is False:
                layers[key] = None
            elif isinstance(value, dict):
                layers[key] = Quantization(
                    value.get("bits", default.bits),
                    value.get("group_size", default.group_size),
                    value.get("mode", mode),
                )
            else:
                raise MistralError(f"quantization.{key} must be an object or false")
    except KeyError as e:
        raise MistralError(f"{source}: quantization has no {e.args[0]}") from None
    except MistralError as e:
        raise MistralError(f"{source}: {e}") from None
    return default, layers


def gather(
    tensors: dict[str, RawTensor], default: Quantization, layers: dict[str, Any], source: str
) -> dict[str, RawTensor | QuantizedTensor]:
    """Each ``<module>.weight`` stored with ``.scales`` and ``.biases`` as one QuantizedTensor,
    checked against its layer's quantization (the override for its module path, else the
    default); every other tensor as it is."""
    out: dict[str, RawTensor | QuantizedTensor] = {}
    used = set()
    for name, t in tensors.items():
        module = name.removesuffix(".weight")
        if not name.endswith(".weight") or module + ".scales" not in tensors:
            continue
        q = layers.get(module, default)
        scales, biases = tensors[module + ".scales"], tensors.get(module + ".biases")
        if q is None or (biases is None) != (q.mode in FLOAT_MODES):
            raise MistralError(f"{source}: {name} is packed, but not as its layer's quantization")
        exponents = q.mode in FLOAT_MODES and scales.dtype == "uint8"
        fits = biases is None or (scales.shape == biases.shape and scales.dtype != "uint8")
        if t.dtype != "uint32" or len(t.shape) != 2 or not (exponents or fits):
            raise MistralError(f"{source}: {name} is not packed uint32 codes with its scales")
        qt = QuantizedTensor(t, scales, biases, q)
        if scales.shape != (t.shape[0], qt.shape[1] // q.group_size) or qt.shape[1] % q.group_size:
            raise MistralError(
                f"{source}: {name}'s scales {scales.shape} do not fit {q.bits}-bit codes "
                f"{t.shape} in groups of {q.group_size}"
            )
        out[name] = qt
        used |= {name, module + ".scales", module + ".biases"}
    for name, t in tensors.items():
        if name not in used:
            if t.dtype in ("uint32", "uint8") or name.endswith((".scales", ".biases")):
                raise MistralError(f"{source}: {name} belongs to no quantized weight")
            out[name] = t
    return out


def quantize(w: np.ndarray, dtype: str, q: Quantization) -> tuple[np.ndarray, RawTensor, RawTensor]:
    """(out, in) values of ``dtype`` (as float32) -> packed codes, scales, biases, bit for bit as
    MLX's affine quantizer: per group, in float32, the scale spans min..max over 2^bits - 1
    steps, signed toward the edge of larger magnitude, which is then made exact (scale = edge /
    its rounded code, bias = edge) so that zero stays representable; codes are
    rint((w - bias) / scale) clipped to the range; scales and biases are stored in ``dtype``."""
    out, n = w.shape
    g, bits = q.group_size, q.bits
    if n % g:
        raise MistralError(f"{n} inputs do not split into groups of {g}")
    groups = w.astype(np.float32).reshape(out, n // g, g)
    w_min, w_max = groups.min(-1), groups.max(-1)
    n_bins = np.float32(2**bits - 1)
    larger_min = np.abs(w_min) > np.abs(w_max)
    scale = np.maximum((w_max - w_min) / n_bins, np.float32(1e-7))
    scale = np.where(larger_min, scale, -scale)
    edge = np.where(larger_min, w_min, w_max)
    q0 = np.rint(edge / scale)
    exact = q0 != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(exact, edge / np.where(exact, q0, 1), scale).astype(np.float32)
    bias = np.where(exact, edge, np.float32(0)).astype(np.float32)
    codes = np.rint((groups - bias[..., None]) / scale[..., None])
    codes = np.clip(codes, 0, n_bins).astype(np.uint32).reshape(out, n)
    return pack(codes, bits), from_numpy(scale, dtype), from_numpy(bias, dtype)


def quantize_float(
    w: np.ndarray, mode: str, dtype: str = "float32"
) -> tuple[np.ndarray, RawTensor]:
    """(out, in) values (as float32) -> packed codes and uint8 scales of a float mode, bit for
    bit as mx.quantize: per group, the scale of mxfp4 is 2^ceil(log2(max|w| / 6)) and of mxfp8
    2^ceil(log2(max|w| / 448)) (an all-zero group: 1), stored as its exponent + 127; of nvfp4,
    max|w| / 6 rounded to an E4M3 value. Each w / scale then goes to the nearest E2M1 value, a
    tie to the smaller magnitude and a value that rounds to zero +0 (mxfp4, nvfp4), or to the
    nearest E4M3 value, ties to even (mxfp8)."""
    _, g = FLOAT_MODES[mode]
    out, n = w.shape
    if n % g:
        raise MistralError(f"{n} inputs do not split into groups of {g}")
    groups = w.astype(np.float32).reshape(out, n // g, g)
    # max|w| over the largest code, computed in the weights' dtype (float16 may underflow to 0)
    ratio = rounded(np.abs(groups).max(-1) / np.float32(E4M3_MAX if mode == "mxfp8" else 6), dtype)
    if mode == "nvfp4":
        scales = e4m3_codes(ratio)
        scale = E4M3[scales]
    else:
        with np.errstate(divide="ignore"):
            exponent = np.ceil(np.log2(ratio))
        scales = np.where(ratio > 0, np.clip(exponent, -127, 127) + 127, 127).astype(np.uint8)
        scale = np.ldexp(np.float32(1), scales.astype(np.int32) - 127).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        x = np.where(scale[..., None] > 0, groups / scale[..., None], np.float32(0))
    if mode == "mxfp8":
        return pack(e4m3_codes(x).reshape(out, n).astype(np.uint32), 8), RawTensor("uint8", scales)
    a = np.abs(x)
    edges = [5.0, 3.5, 2.5, 1.75, 1.25, 0.75, 0.25]  # midpoints between E2M1 magnitudes
    codes = np.select([a > e for e in edges], [7, 6, 5, 4, 3, 2, 1], 0).astype(np.uint32)
    codes = np.where((codes > 0) & np.signbit(x), codes | 8, codes).reshape(out, n)
    return pack(codes, 4), RawTensor("uint8", scales)


E4M3_MAGNITUDES = E4M3[:0x7F]  # codes 0..126, increasing (127 is NaN)


def e4m3_codes(x: np.ndarray) -> np.ndarray:
    """float32 values -> uint8 E4M3 codes, the nearest value, ties to the even code; the sign
    kept (a negative value that rounds to zero is -0); beyond 448, 448."""
    a = np.minimum(np.abs(x), E4M3_MAGNITUDES[-1])
    upper = np.clip(np.searchsorted(E4M3_MAGNITUDES, a), 1, len(E4M3_MAGNITUDES) - 1)
    lower = upper - 1
    below, above = a - E4M3_MAGNITUDES[lower], E4M3_MAGNITUDES[upper] - a
    pick_upper = (above < below) | ((above == below) & (upper % 2 == 0))
    codes = np.where(pick_upper, upper, lower).astype(np.uint8)
    return np.where(np.signbit(x), codes | 0x80, codes).astype(np.uint8)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """(rows, n) codes -> (rows, n * bits / 32) uint32, least significant bits first."""
    rows, n = codes.shape
    stream = (codes[..., None] >> np.arange(bits, dtype=np.uint32)) & 1  # (rows, n, bits)
    raw = np.packbits(stream.reshape(rows, n * bits).astype(np.uint8), axis=-1, bitorder="little")
    return raw.view("<u4").astype(np.uint32)


HALVES = (".embed_q.weight", ".unembed_out.weight")  # mistral/absorbed.py


@dataclass
class Deferred:
    """A tensor made when it is written (one at a time, so a conversion holds about one
    weight): the packed codes, scales or biases of a weight being quantized."""

    dtype: str
    shape: tuple[int, ...]
    make: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.shape, self.dtype)

    @property
    def data(self) -> np.ndarray:
        return self.make()


def quantized_items(
    items: list[tuple[str, RawTensor]],
    q: Quantization,
    dtype: str | None,
    whole: tuple[str, ...] = (),
) -> list[tuple[str, Deferred]]:
    """Hugging Face-named tensors, cast to ``dtype`` (None: as they are), with every weight of a
    Linear or Embedding whose inputs split into groups (2-D, as mlx-lm's quantize chooses them;
    3-D: stacked experts, latent attention's per-head halves) as codes, scales and biases, each
    computed as it is written; names ending in ``whole`` (modules mlx-lm does not quantize, such
    as DeepSeek's gate) as they are."""
    out: list[tuple[str, Deferred]] = []
    made: dict[str, tuple[np.ndarray, RawTensor, RawTensor]] = {}

    parts = 2 if q.mode in FLOAT_MODES else 3  # codes and scales, and affine's biases

    def part(name: str, t: RawTensor, i: int) -> Callable[[], np.ndarray]:
        def make() -> np.ndarray:
            if name not in made:
                w = cast(t, dtype).to_numpy()
                rows = w.reshape(-1, w.shape[-1])  # stacked experts: their rows one after another
                floats = q.mode in FLOAT_MODES
                kind = dtype or t.dtype
                made[name] = (
                    quantize_float(rows, q.mode, kind) if floats else quantize(rows, kind, q)
                )
            value = made[name][i]
            if i == parts - 1:
                del made[name]  # the last part is written last
            value = value if isinstance(value, np.ndarray) else value.data
            return value.reshape(*t.shape[:-1], -1)

        return make

    for name, t in items:
        kind = dtype or t.dtype
        stacked = ".switch_mlp." in name or name.endswith(HALVES)  # one matrix per expert, head
        matrix = len(t.shape) == 2 or (len(t.shape) == 3 and stacked)
        kept = not matrix or name.endswith(whole) or not name.endswith(".weight")
        if kept or t.shape[-1] % q.group_size:
            out.append((name, Deferred(kind, t.shape, lambda t=t: cast(t, dtype).data)))
            continue
        *lead, n = t.shape  # (out, in), or (experts, out, in): groups run along each row alike
        module = name.removesuffix(".weight")
        groups = (*lead, n // q.group_size)
        out.append((name, Deferred("uint32", (*lead, n * q.bits // 32), part(name, t, 0))))
        scales = "uint8" if q.mode in FLOAT_MODES else kind
        out.append((module + ".scales", Deferred(scales, groups, part(name, t, 1))))
        if parts == 3:
            out.append((module + ".biases", Deferred(kind, groups, part(name, t, 2))))
    return out
