"""Model folders in three layouts (Mistral, Hugging Face, MLX), read and written framework-free.

    mistral  params.json + consolidated.safetensors (or consolidated.00.pth), Mistral key names
    hf       config.json + model.safetensors (or shards and their index), HF names, wq/wk permuted
    mlx      params.json or config.json + weights.npz / weights.safetensors (mlx-examples)

Folders written by mlx-lm are Hugging Face folders (its Mixtral stacks experts; they are unstacked).
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mistral import hf
from mistral.args import ModelArgs
from mistral.backend import runtime
from mistral.errors import MistralError
from mistral.safetensors_file import read_tensors, write_tensors
from mistral.weights import DTYPES, RawTensor, cast, cast_nbytes

DEFAULT_MODEL = Path(__file__).resolve().parent / "default_model"  # the embedded model

FORMATS = ("mistral", "hf", "mlx")
TOKENIZER_FILES = ("tokenizer.model.v3", "tokenizer.model", "tokenizer.model.v1")
HF_SHARD_BYTES = 5 * 2**30


@dataclass
class Checkpoint:
    """A model folder read into memory-mapped tensors named by the spec's checkpoint keys."""

    path: Path
    format: str
    args: ModelArgs
    tensors: dict[str, RawTensor]

    @property
    def tokenizer_path(self) -> Path | None:
        return next((self.path / f for f in TOKENIZER_FILES if (self.path / f).is_file()), None)


def detect_format(path: Path) -> str:
    if not path.is_dir():
        raise MistralError(f"{path}: not a model folder")
    if any(path.glob("weights*.npz")) or any(path.glob("weights*.safetensors")):
        return "mlx"
    if (path / "params.json").exists():
        return "mistral"
    if (path / "config.json").exists():
        return "hf"
    raise MistralError(
        f"{path}: no known checkpoint format (params.json + consolidated.safetensors, "
        "config.json + model.safetensors, or weights.npz)"
    )


def read_npz(path: Path) -> dict[str, RawTensor]:
    try:
        archive = np.load(path, allow_pickle=False)
        out = {}
        for name in archive.files:
            a = archive[name]  # npz members are read one at a time
            if a.dtype.name not in DTYPES:
                raise MistralError(f"{path}: {name} has unsupported dtype {a.dtype}")
            out[name] = RawTensor(a.dtype.name, tuple(a.shape), a)
        return out
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise MistralError(f"{path}: unreadable npz ({e})") from None


def names_to_spec(
    args: ModelArgs, tensors: dict[str, RawTensor], source: str
) -> dict[str, RawTensor]:
    """Accepts either naming: Mistral's checkpoint keys, or Hugging Face's (converted)."""
    if any(k.startswith(("model.", "lm_head.")) for k in tensors):
        return hf.tensors_from_hf(args, tensors, source)
    return tensors


def _read_args(path: Path) -> ModelArgs:
    if (path / "params.json").exists():
        return ModelArgs.from_file(path / "params.json")
    return hf.read_config(path / "config.json")


def _read_safetensors_set(
    path: Path, single: str, index: str, pattern: str
) -> dict[str, RawTensor]:
    if (path / single).exists():
        return read_tensors(path / single)
    if (path / index).exists():
        try:
            shards = sorted(set(json.loads((path / index).read_text())["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise MistralError(f"{path / index}: unreadable index ({e})") from None
    else:
        shards = sorted(p.name for p in path.glob(pattern))
    if not shards:
        raise MistralError(f"{path}: no {single} (or its shards)")
    out: dict[str, RawTensor] = {}
    for shard in shards:
        if not (path / shard).exists():
            raise MistralError(f"{path}: shard {shard} is missing")
        out.update(read_tensors(path / shard))
    return out


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Detects the folder's format from its contents and reads it (tensors stay memory-mapped)."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "hf":
        args = hf.read_config(path / "config.json")
        raw = _read_safetensors_set(
            path, "model.safetensors", "model.safetensors.index.json", "model-*.safetensors"
        )
    elif fmt == "mistral":
        args = ModelArgs.from_file(path / "params.json")
        if any(path.glob("consolidated*.safetensors")):
            raw = _read_safetensors_set(
                path, "consolidated.safetensors", "-", "consolidated*.safetensors"
            )
        elif (path / "consolidated.00.pth").exists():
            raw = _read_pth(path / "consolidated.00.pth")
        else:
            raise MistralError(f"{path}: params.json but no consolidated.safetensors or .00.pth")
    else:
        args = _read_args(path)
        raw = {}
        for f in sorted(path.glob("weights*.npz")):
            raw.update(read_npz(f))
        for f in sorted(path.glob("weights*.safetensors")):
            raw.update(read_tensors(f))
    return Checkpoint(path, fmt, args, names_to_spec(args, raw, str(path)))


def _read_pth(path: Path) -> dict[str, RawTensor]:
    try:
        reader = runtime("torch")
    except MistralError:
        raise MistralError(f"{path}: reading a .pth checkpoint needs torch") from None
    return reader.read_pth(str(path))


def write_checkpoint(
    path: str | Path,
    fmt: str,
    args: ModelArgs,
    tensors: dict[str, RawTensor],
    dtype: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Writes a folder in ``fmt``, streaming tensor by tensor (cast to ``dtype`` if given)."""
    if fmt not in FORMATS:
        raise MistralError(f"unknown format {fmt!r}: use {', '.join(FORMATS)}")
    if dtype is not None and dtype not in DTYPES:
        raise MistralError(f"unknown dtype {dtype!r}: use {', '.join(DTYPES)}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    out_dtype = dtype or next(iter(tensors.values())).dtype
    if fmt == "hf":
        (path / "config.json").write_text(
            json.dumps(hf.config_from_args(args, out_dtype), indent=2)
        )
        named = list(hf.tensors_to_hf(args, tensors).items())
        shards = _shard(named, dtype)
        if len(shards) == 1:
            write_tensors(path / "model.safetensors", shards[0], dtype, progress)
            return
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_tensors(path / name, shard, dtype, progress)
            weight_map.update({k: name for k, _ in shard})
        index = {"metadata": {}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return
    (path / "params.json").write_text(json.dumps(args.to_params(), indent=2) + "\n")
    items = list(tensors.items())
    if fmt == "mistral":
        write_tensors(path / "consolidated.safetensors", items, dtype, progress)
    elif out_dtype == "bfloat16":  # numpy's .npy has no bfloat16: MLX reads safetensors as well
        write_tensors(path / "weights.safetensors", items, dtype, progress)
    else:
        _write_npz(path / "weights.npz", items, dtype, progress)


def write_mistral_folder(path: str | Path, args: ModelArgs, tensors: dict[str, RawTensor]) -> None:
    write_checkpoint(path, "mistral", args, tensors)


def _shard(items: list[tuple[str, RawTensor]], dtype: str | None) -> list[list]:
    shards: list[list] = [[]]
    size = 0
    for name, t in items:
        n = cast_nbytes(t, dtype)
        if shards[-1] and size + n > HF_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += n
    return shards


def _write_npz(path: Path, items, dtype: str | None, progress) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, t in items:
            t = cast(t, dtype)
            with zf.open(name + ".npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(t.data).reshape(t.shape))
            if progress:
                progress(t.nbytes)
