"""Reading PyTorch checkpoints (torch.save's zip format) with numpy alone, memory-mapped.

The pickle inside is loaded by an unpickler that knows only the few globals torch writes for a
dict of tensors, so no code from the file ever runs. Each tensor is a strided, read-only view of
its storage record, which is checked to be long enough for every element the tensor addresses.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mistral.errors import MistralError
from mistral.files import regular_file, zip_member_offset
from mistral.weights import RawTensor

# torch's legacy typed storage classes, which name the dtype of each storage record.
_STORAGES = {
    "FloatStorage": ("float32", np.float32),
    "HalfStorage": ("float16", np.float16),
    "BFloat16Storage": ("bfloat16", np.uint16),
}
_EXPECTED = "float32, float16 or bfloat16"
_UNSUPPORTED = {
    "DoubleStorage": "float64",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}
# Errors that a malformed file can raise from zipfile (RuntimeError for encrypted members and
# unknown zip features), pickle, struct or numpy.
_MALFORMED = (
    zipfile.BadZipFile,
    pickle.UnpicklingError,
    struct.error,
    EOFError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    OverflowError,
    RuntimeError,
)


# What persistent_load and _rebuild_tensor_v2 hand to the pickle: frozen and slotted, so a
# crafted BUILD opcode can change neither, and the arrays inside never reach the pickle.
@dataclass(frozen=True, slots=True)
class _Storage:
    dtype: str
    array: np.ndarray


@dataclass(frozen=True, slots=True)
class _Tensor:
    dtype: str
    data: np.ndarray


def _ints(x: object) -> tuple[int, ...]:
    if not isinstance(x, tuple) or not all(type(i) is int for i in x):
        raise MistralError(f"tensor size or stride is {_what(x)}, not a tuple of ints")
    return x


def _rebuild_tensor_v2(
    storage: _Storage, offset: int, size: tuple, stride: tuple, *_: object
) -> _Tensor:
    """torch._utils._rebuild_tensor_v2: a view of the storage, every element inside it."""
    size, stride = _ints(size), _ints(stride)
    if not isinstance(storage, _Storage) or type(offset) is not int or len(size) != len(stride):
        raise MistralError("malformed tensor record")
    if min(size, default=1) < 0 or min(stride, default=0) < 0 or offset < 0:
        raise MistralError(f"negative size, stride or offset in tensor {size}")
    numel = len(storage.array)
    if 0 in size:
        data = np.empty(size, storage.array.dtype)
    elif offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) >= numel:
        raise MistralError(f"tensor {size} at offset {offset} overruns its storage of {numel}")
    else:
        byte_strides = tuple(s * storage.array.itemsize for s in stride)
        view = storage.array[offset:]
        data = np.lib.stride_tricks.as_strided(view, size, byte_strides, writeable=False)
    return _Tensor(storage.dtype, data)


def _rebuild_parameter(data: _Tensor, *_: object) -> _Tensor:
    """torch._utils._rebuild_parameter: what torch writes for an nn.Parameter."""
    return data


_GLOBALS = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, pkl: bytes, zf: zipfile.ZipFile, top: str, mm: np.ndarray) -> None:
        super().__init__(io.BytesIO(pkl))
        self.zf, self.top, self.mm = zf, top, mm

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in _GLOBALS:  # the only callables the pickle can reach
            return _GLOBALS[(module, name)]
        if module == "torch" and (name in _STORAGES or name in _UNSUPPORTED):
            return name  # a storage type only names a dtype: a plain string carries it
        raise MistralError(f"refusing pickled global {module}.{name}")

    def persistent_load(self, pid: object) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise MistralError(f"unknown persistent id (a {type(pid).__name__})")
        _, kind, key, _, numel = pid
        if kind in _UNSUPPORTED:
            raise MistralError(f"unsupported dtype {_UNSUPPORTED[kind]}; expected {_EXPECTED}")
        if kind not in _STORAGES or type(key) is not str or type(numel) is not int or numel < 0:
            raise MistralError("malformed storage record")
        dtype, np_type = _STORAGES[kind]
        member = f"{self.top}/data/{key}"
        try:
            info = self.zf.getinfo(member)
        except KeyError:
            raise MistralError(f"missing member {member}") from None
        start, nbytes = zip_member_offset(self.mm, info), numel * np.dtype(np_type).itemsize
        if info.file_size < nbytes or start + nbytes > len(self.mm):
            raise MistralError(f"storage {member} holds {info.file_size} bytes, needs {nbytes}")
        return _Storage(dtype, self.mm[start : start + nbytes].view(np_type))


def _check_memo(pkl: bytes) -> None:
    """The C unpickler grows its memo to the largest index it is told to store at, zeroing it: one
    crafted BINPUT could claim gigabytes. torch numbers its memo 0, 1, 2, ..."""
    for n, (op, arg, _) in enumerate(pickletools.genops(pkl)):
        if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and arg > n:
            raise MistralError(f"malformed pickle (memo index {arg} at opcode {n})")


def read_pth(path: str | Path) -> dict[str, RawTensor]:
    """Every tensor of a torch.save'd dict of tensors, memory-mapped; refuses anything else."""
    path = Path(path)
    regular_file(path)
    try:
        got = _read(path)
    except MistralError as e:
        raise _refusal(path, str(e)) from None
    except OSError as e:
        raise _refusal(path, f"cannot read ({e.strerror or e})") from None
    except _MALFORMED as e:
        raise _refusal(path, f"corrupt torch checkpoint ({type(e).__name__}: {e})") from None
    return {k: RawTensor(dtype=t.dtype, source=t.data) for k, t in got.items()}


def _refusal(path: Path, why: str) -> MistralError:
    return MistralError(f"{path}: " + " ".join(why.split()))  # one line, whatever the file holds


def _read(path: Path) -> dict[str, _Tensor]:
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise MistralError(
            "not a plain tensor checkpoint (not a zip archive as torch.save writes)"
        ) from None
    with zf:
        pkls = [n for n in zf.namelist() if n.endswith("/data.pkl")]
        if len(pkls) != 1:
            raise MistralError("not a plain tensor checkpoint (no single data.pkl)")
        top = pkls[0][: -len("/data.pkl")]
        if f"{top}/byteorder" in zf.namelist():
            order = zf.read(f"{top}/byteorder").decode(errors="replace")
            if order != "little":
                raise MistralError(f"byte order {order!r} is not supported")
        pkl = zf.read(pkls[0])
        _check_memo(pkl)
        mm = np.memmap(path, dtype=np.uint8, mode="r")
        obj = _Unpickler(pkl, zf, top, mm).load()
    if not isinstance(obj, dict):
        raise MistralError(f"top level is {_what(obj)}, not a dict of tensors")
    for k, v in obj.items():
        if not isinstance(k, str):
            raise MistralError(f"a key is {_what(k)}, not a string")
        if not isinstance(v, _Tensor):
            raise MistralError(f"entry {k!r} is {_what(v)}, not a tensor")
    return obj


def _what(x: object) -> str:
    name = "tensor" if isinstance(x, _Tensor) else type(x).__name__
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"
