"""Reading model folders: the architecture and the raw tensors, without a framework."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mistral import hf
from mistral.args import ModelArgs
from mistral.backend import runtime
from mistral.errors import MistralError
from mistral.safetensors_file import read_tensors, write_tensors
from mistral.weights import RawTensor


@dataclass
class Checkpoint:
    """A model folder read into memory-mapped tensors named by the spec's checkpoint keys."""

    path: Path
    format: str
    args: ModelArgs
    tensors: dict[str, RawTensor]


def read_mistral_folder(path: Path) -> Checkpoint:
    """params.json with consolidated.safetensors or consolidated.00.pth (Mistral's own layout)."""
    args = ModelArgs.from_file(path / "params.json")
    st = path / "consolidated.safetensors"
    pth = path / "consolidated.00.pth"
    if st.exists():
        tensors = read_tensors(st)
    elif pth.exists():
        try:
            tensors = runtime("torch").read_pth(str(pth))
        except MistralError as e:
            if "needs torch" in str(e):
                raise MistralError(f"{pth}: reading a .pth checkpoint needs torch") from None
            raise
    else:
        raise MistralError(f"{path}: params.json but no consolidated.safetensors or .00.pth")
    return Checkpoint(path, "mistral", args, tensors)


def read_hf_folder(path: Path) -> Checkpoint:
    """config.json with model.safetensors or shards listed in model.safetensors.index.json."""
    args = hf.read_config(path / "config.json")
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.exists():
        raw = read_tensors(single)
    elif index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise MistralError(f"{index}: unreadable index ({e})") from None
        raw = {}
        for shard in sorted(set(weight_map.values())):
            if not (path / shard).exists():
                raise MistralError(f"{index}: shard {shard} is missing")
            raw.update(read_tensors(path / shard))
    else:
        raise MistralError(f"{path}: config.json but no model.safetensors or its index")
    return Checkpoint(path, "hf", args, hf.tensors_from_hf(args, raw, str(path)))


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Detects the folder's format from its contents and reads it."""
    path = Path(path)
    if not path.is_dir():
        raise MistralError(f"{path}: not a model folder")
    if (path / "params.json").exists():
        return read_mistral_folder(path)
    if (path / "config.json").exists():
        return read_hf_folder(path)
    raise MistralError(f"{path}: no known checkpoint format (no params.json or config.json)")


def write_mistral_folder(path: str | Path, args: ModelArgs, tensors: dict[str, RawTensor]) -> None:
    """params.json and consolidated.safetensors, tensors written one at a time."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "params.json").write_text(json.dumps(args.to_params(), indent=2) + "\n")
    write_tensors(path / "consolidated.safetensors", list(tensors.items()))
