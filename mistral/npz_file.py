"""Reading .npz weight files (numpy's zip of .npy members) memory-mapped, with numpy alone."""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np

from mistral.errors import MistralError
from mistral.files import regular_file, zip_member_offset
from mistral.weights import DTYPES, RawTensor


def read_npz(path: str | Path) -> dict[str, RawTensor]:
    """Every array of the file as a memory-mapped view, none read at load. Members must be
    stored (compressed ones could inflate to any size), little-endian float arrays of the
    supported dtypes in C order (no pickled objects), each exactly as long as its header says."""
    path = Path(path)
    regular_file(path)
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
        mm = np.memmap(path, dtype=np.uint8, mode="r")
        return dict(member(path, mm, info) for info in infos)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        why = " ".join(str(e).split()) or type(e).__name__
        raise MistralError(f"{path}: unreadable npz ({why})") from None


def member(path: Path, mm: np.ndarray, info: zipfile.ZipInfo) -> tuple[str, RawTensor]:
    name = info.filename.removesuffix(".npy")
    try:
        start = zip_member_offset(mm, info)
    except MistralError as e:
        raise MistralError(f"{path}: {e}") from None
    header = mm[start : start + min(info.file_size, 65536 + 10)]
    f = _Reader(header.tobytes())
    version = np.lib.format.read_magic(f)
    read = {
        (1, 0): np.lib.format.read_array_header_1_0,
        (2, 0): np.lib.format.read_array_header_2_0,
    }
    if version not in read:
        raise MistralError(f"{path}: {name} has .npy version {version}")
    shape, fortran, dtype = read[version](f, max_header_size=65536)
    if dtype.name not in DTYPES or dtype.byteorder == ">" or fortran:
        raise MistralError(f"{path}: {name} has unsupported dtype {dtype} (or Fortran order)")
    nbytes = math.prod(shape) * dtype.itemsize
    if info.file_size != f.at + nbytes:
        raise MistralError(f"{path}: {name} holds {info.file_size - f.at} bytes, needs {nbytes}")
    data = mm[start + f.at : start + f.at + nbytes].view(dtype.newbyteorder("<"))
    return name, RawTensor(dtype.name, data.reshape(shape))


class _Reader:
    """The file object numpy's header readers want, over bytes already in memory."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def read(self, n: int) -> bytes:
        out = self.data[self.at : self.at + n]
        self.at += len(out)
        return out
