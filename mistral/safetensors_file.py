"""Reading and writing .safetensors with numpy alone (memory-mapped, bfloat16 kept as bits)."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mistral.errors import MistralError
from mistral.weights import RawTensor, cast, cast_nbytes

_CODES = {
    "F32": ("float32", np.float32),
    "F16": ("float16", np.float16),
    "BF16": ("bfloat16", np.uint16),
}
_NAMES = {name: code for code, (name, _) in _CODES.items()}
_MAX_HEADER = 100 * 1024 * 1024


def read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the offset where its data starts."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise MistralError(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER:
                raise MistralError(f"{path}: corrupt safetensors header (length {n})")
            if n > size - 8:
                raise MistralError(f"{path}: truncated safetensors file ({size} bytes, header {n})")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MistralError(f"{path}: corrupt safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise MistralError(f"{path}: corrupt safetensors header")
    header.pop("__metadata__", None)
    return header, 8 + n


def read_tensors(path: str | Path) -> dict[str, RawTensor]:
    """Every tensor of the file, memory-mapped; checks offsets against the file size."""
    path = Path(path)
    header, start = read_header(path)
    data_len = path.stat().st_size - start
    mm = np.memmap(path, dtype=np.uint8, mode="r", offset=start) if data_len else None
    out = {}
    for name, info in header.items():
        try:
            code, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise MistralError(f"{path}: corrupt header entry for {name}") from None
        if code not in _CODES:
            raise MistralError(f"{path}: {name} has unsupported dtype {code}")
        dtype, np_type = _CODES[code]
        count = int(np.prod(shape, dtype=np.int64))
        if end > data_len or begin > end or end - begin != count * np.dtype(np_type).itemsize:
            raise MistralError(f"{path}: truncated or corrupt data for {name}")
        data = mm[begin:end].view(np_type) if count else np.empty(0, np_type)
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
