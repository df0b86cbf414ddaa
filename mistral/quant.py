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

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from mistral.errors import MistralError
from mistral.weights import RawTensor, from_numpy

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class Quantization:
    """One layer's: bits per code and inputs per group (mode affine)."""

    bits: int
    group_size: int

    def __post_init__(self) -> None:
        if self.bits not in BITS or self.group_size not in GROUP_SIZES:
            raise MistralError(
                f"affine quantization of {self.bits} bits in groups of {self.group_size} is not "
                f"supported (bits {BITS}, groups {GROUP_SIZES})"
            )


@dataclass(frozen=True)
class QuantizedTensor:
    """A weight as packed codes with their scales and biases; ``shape`` is the weight's own."""

    packed: RawTensor  # uint32 (out, in * bits / 32)
    scales: RawTensor  # (out, in / group_size), float
    biases: RawTensor
    q: Quantization

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.packed.shape[0], self.packed.shape[1] * 32 // self.q.bits)

    @property
    def dtype(self) -> str:
        return self.scales.dtype

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales.nbytes + self.biases.nbytes

    def reorder_rows(self, order: np.ndarray) -> QuantizedTensor:
        """Rows (whole output channels, groups and all) in another order, as wq/wk need."""
        return replace(
            self,
            packed=self.packed.reorder_rows(order),
            scales=self.scales.reorder_rows(order),
            biases=self.biases.reorder_rows(order),
        )

    def dequantized(self, dtype: str | None = None) -> RawTensor:
        """The weight in ``dtype`` (default: the scales'), computed in it from the scales and
        biases cast to it: bit for bit what mx.dequantize gives on those."""
        dtype = dtype or self.scales.dtype
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
    codes = unpack(t.packed.data, t.q.bits, n).reshape(out, n // g, g).astype(np.float32)
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
    if mode != "affine":
        raise MistralError(f"{source}: quantization mode {mode!r} is not supported yet (affine)")
    try:
        default = Quantization(block["bits"], block["group_size"])
        layers = {}
        for key, value in block.items():
            if key in ("bits", "group_size", "mode"):
                continue
            if value is False:
                layers[key] = None
            elif isinstance(value, dict):
                layers[key] = Quantization(
                    value.get("bits", default.bits), value.get("group_size", default.group_size)
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
        if q is None or biases is None:
            raise MistralError(f"{source}: {name} is packed but its layer is not quantized")
        if t.dtype != "uint32" or len(t.shape) != 2 or scales.shape != biases.shape:
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
            if t.dtype == "uint32" or name.endswith((".scales", ".biases")):
                raise MistralError(f"{source}: {name} belongs to no quantized weight")
            out[name] = t
    return out
