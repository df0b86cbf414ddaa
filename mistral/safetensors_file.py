"""Reading and writing .safetensors with numpy alone (memory-mapped, bfloat16 kept as bits)."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mistral.errors import MistralError
from mistral.files import regular_file
from mistral.weights import RawTensor, cast, cast_nbytes

_CODES = {
    "F32": ("float32", np.float32),
    "F16": ("float16", np.float16),
    "BF16": ("bfloat16", np.uint16),
    "U32": ("uint32", np.uint32),  # packed quantized codes (mistral/quant.py)
    "U8": ("uint8", np.uint8),  # mxfp4's scales
    "F8_E4M3": ("float8_e4m3", np.uint8),  # FP8 checkpoints' codes (mistral/fp8.py)
}
_NAMES = {name: code for code, (name, _) in _CODES.items()}
_MAX_HEADER = 100 * 1024 * 1024


def unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object whose keys are all different (json.loads keeps the last of a duplicate)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = [k for i, (k, _) in enumerate(pairs) if k in dict(pairs[:i])]
        raise MistralError(f"duplicate key {seen[0]!r}")
    return out


def read_header(path: Path) -> tuple[dict, int, int]:
    """The JSON header of a safetensors file, the offset where its data starts and its length."""
    size = regular_file(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise MistralError(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER:
                raise MistralError(f"{path}: corrupt safetensors header (length {n})")
            if n > size - 8:
                raise MistralError(f"{path}: truncated safetensors file ({size} bytes, header {n})")
            header = json.loads(f.read(n), object_pairs_hook=unique_keys)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        why = "nested too deep" if isinstance(e, RecursionError) else e
        raise MistralError(f"{path}: corrupt safetensors file ({why})") from None
    except MistralError as e:
        raise MistralError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise MistralError(f"{path}: corrupt safetensors header")
    header.pop("__metadata__", None)
    return header, 8 + n, size - 8 - n


def entry(info: object) -> tuple[str, tuple[int, ...], int, int] | None:
    """(dtype code, shape, begin, end) of a header entry, or None if it is not well formed."""
    if not isinstance(info, dict):
        return None
    code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not isinstance(offsets, list) or len(offsets) != 2:
        return None
    if not all(type(x) is int and x >= 0 for x in [*shape, *offsets]):  # bool is not int here
        return None
    return code, tuple(shape), offsets[0], offsets[1]


def read_tensors(path: str | Path) -> dict[str, RawTensor]:
    """Every tensor of the file, memory-mapped. The header must describe ranges that tile the
    data exactly (no gap, no overlap, nothing past the end), each as long as its shape needs."""
    path = Path(path)
    header, start, data_len = read_header(path)
    entries = {}
    for name, info in header.items():
        parsed = entry(info)
        if parsed is None:
            raise MistralError(f"{path}: corrupt header entry for {name}")
        code, shape, begin, end = parsed
        if code not in _CODES:
            raise MistralError(f"{path}: {name} has unsupported dtype {code}")
        count = math.prod(shape)  # Python ints: no overflow whatever the header says
        if end - begin != count * np.dtype(_CODES[code][1]).itemsize:
            raise MistralError(f"{path}: {name}'s range does not fit its shape {list(shape)}")
        entries[name] = parsed
    at = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda e: (e[1][2], e[1][3])):
        if begin != at:
            gap = "overlaps the tensor before it" if begin < at else "leaves a gap before it"
            raise MistralError(f"{path}: {name}'s data range {gap}")
        at = end
    if at != data_len:
        raise MistralError(
            f"{path}: truncated or corrupt data ({data_len} bytes, header says {at})"
        )
    mm = np.memmap(path, dtype=np.uint8, mode="r", offset=start) if data_len else None
    out = {}
    for name, (code, shape, begin, end) in entries.items():
        dtype, np_type = _CODES[code]
        data = mm[begin:end].view(np_type) if end > begin else np.empty(0, np_type)
        out[name] = RawTensor(dtype, data.reshape(shape))
    return out


def write_tensors(
    path: str | Path,
    tensors: list[tuple[str, RawTensor]],
    dtype: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Writes the header, then each tensor in turn, cast to ``dtype`` when given (peak memory:
    about one tensor). ``progress`` is called with the bytes of each tensor written."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in tensors:
        n = cast_nbytes(t, dtype)
        code = _NAMES[dtype or t.dtype]
        header[name] = {"dtype": code, "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, t in tensors:
            t = cast(t, dtype)
            f.write(np.ascontiguousarray(t.data).tobytes())
            if progress:
                progress(t.nbytes)
