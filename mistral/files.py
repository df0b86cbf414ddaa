"""Files named from outside are hostile until checked: regular files only, inside their folder."""

from __future__ import annotations

import errno
import json
import os
import stat
import struct
import zipfile
from pathlib import Path

import numpy as np

from mistral.errors import MistralError


def inside(folder: Path, name: str) -> Path:
    """``folder / name``, refused unless it stays inside the folder: the name may not climb out
    ("..", an absolute path), and a link must resolve inside the folder or, for a snapshot of
    Hugging Face's hub cache (``.../snapshots/<revision>/``), inside that repository's blobs/."""
    path = folder / name
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise MistralError(f"{folder}: {name!r} points outside the model folder")
    try:
        target = path.resolve()
        roots = [folder.resolve()]
        if folder.parent.name == "snapshots":
            roots.append((folder.parent.parent / "blobs").resolve())
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise MistralError(f"{path}: cannot resolve ({e})") from None
    if not any(target.is_relative_to(root) for root in roots):
        raise MistralError(f"{folder}: {name!r} points outside the model folder")
    return path


def present(path: Path) -> bool:
    """Whether ``path`` is there; a link that leads nowhere or in a circle is an error, not an
    absent file."""
    if path.exists():
        return True
    if path.is_symlink():
        try:
            path.resolve(strict=True)
        except RuntimeError:  # Python < 3.13
            raise MistralError(f"{path}: a symlink loop") from None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise MistralError(f"{path}: a symlink loop") from None
            raise MistralError(f"{path}: a link to nothing ({os.readlink(path)})") from None
    return False


def regular_file(path: Path) -> int:
    """The size of ``path``, refused unless it is a regular file (a FIFO or a device would
    hang or never end)."""
    try:
        st = path.stat()
    except OSError as e:
        raise MistralError(f"{path}: cannot read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise MistralError(f"{path}: not a regular file")
    return st.st_size


def read_json(path: Path) -> dict:
    regular_file(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        why = "nested too deep" if isinstance(e, RecursionError) else str(e).splitlines()[0]
        raise MistralError(f"{path}: cannot read JSON ({why})") from None
    if not isinstance(data, dict):
        raise MistralError(f"{path}: expected a JSON object")
    return data


def zip_member_offset(mm: np.ndarray, info: zipfile.ZipInfo) -> int:
    """Where a stored (uncompressed) member's bytes start, from its local file header."""
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 1:
        raise MistralError(f"member {info.filename} is compressed or encrypted")
    head = mm[info.header_offset : info.header_offset + 30].tobytes()
    if len(head) < 30 or head[:4] != b"PK\x03\x04":
        raise MistralError(f"bad local header for member {info.filename}")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    return info.header_offset + 30 + name_len + extra_len
