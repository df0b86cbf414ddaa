"""Model folders in three layouts (Mistral, Hugging Face, MLX), read and written framework-free.

    mistral       params.json + consolidated.safetensors (or its shards, or consolidated.00.pth)
    hf            config.json + model.safetensors (or shards and their index), HF names, wq/wk
                  permuted; also what mlx-lm reads and writes ("mlx" when writing)
    mlx-examples  params.json or config.json + weights*.npz / weights*.safetensors

Reading: LAYOUTS is the table, one reader per layout, the first whose files a folder has is used;
each reader returns the args and the tensors named by the spec's checkpoint keys. Folders written
by mlx-lm are Hugging Face folders (its Mixtral stacks experts; they are unstacked).
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mistral import absorbed, hf, hf_config, hub, quant
from mistral.args import VISION_KEYS, ModelArgs
from mistral.errors import MistralError
from mistral.files import inside, present, read_json
from mistral.fp8 import FP8Tensor, fp8_block, gather_mistral_fp8, mistral_fp8
from mistral.npz_file import read_npz
from mistral.pth_file import read_pth
from mistral.quant import Quantization, QuantizedTensor
from mistral.safetensors_file import read_tensors, write_tensors
from mistral.weights import DTYPES, RawTensor, cast, cast_nbytes

DEFAULT_MODEL = Path(__file__).resolve().parent / "default_model"  # the embedded model
CONFIGS = Path(__file__).resolve().parent / "configs"  # named shapes (params.json) for bench

# What `convert --to` writes. mlx is the layout mlx-lm reads and writes today, which is Hugging
# Face's (config.json + model*.safetensors); mlx-examples is the older params.json + weights.npz.
FORMATS = ("mistral", "hf", "mlx", "mlx-examples")
TOKENIZER_FILES = (  # best first: tekken (2024-), then sentencepiece by version
    "tekken.json",
    "tokenizer.model.v7",
    "tokenizer.model.v3",
    "tokenizer.model",
    "tokenizer.model.v1",
)
HF_SHARD_BYTES = 5 * 2**30

Tensors = dict[str, RawTensor]


@dataclass
class Checkpoint:
    """A model folder read into memory-mapped tensors named by the spec's checkpoint keys."""

    path: Path
    format: str
    args: ModelArgs
    tensors: Tensors

    @property
    def tokenizer_files(self) -> list[Path]:
        """The tokenizer files the folder holds, best first; one that leads out of the folder (a
        link to elsewhere) is refused."""
        return [inside(self.path, f) for f in TOKENIZER_FILES if present(self.path / f)]

    @property
    def tokenizer_path(self) -> Path | None:
        return next(iter(self.tokenizer_files), None)


def read_config(path: Path) -> ModelArgs:
    """params.json (Mistral's keys), or a config.json in Hugging Face's keys (it names its
    model_type) or in Mistral's (as mlx-examples wrote them)."""
    if path.name == "params.json":
        return ModelArgs.from_params(read_json(path), str(path))
    config = read_json(path)
    if "model_type" in config:
        return hf_config.args_from_config(config, str(path))
    return ModelArgs.from_params(config, str(path))


def read_safetensors_set(path: Path, stem: str) -> Tensors:
    """``stem``.safetensors, or the shards its index names, or the files ``stem``*.safetensors."""
    index = path / f"{stem}.safetensors.index.json"
    if (path / f"{stem}.safetensors").exists():
        files = [path / f"{stem}.safetensors"]
    elif index.is_file():
        names = read_json(index).get("weight_map")
        if not isinstance(names, dict) or not all(isinstance(v, str) for v in names.values()):
            raise MistralError(f"{index}: no weight_map of tensor names to files")
        files = [inside(path, name) for name in sorted(set(names.values()))]
    else:
        files = sorted(path.glob(f"{stem}*.safetensors"))
    if not files:
        raise MistralError(f"{path}: no {stem}.safetensors (or its shards)")
    out: Tensors = {}
    for f in files:
        if not present(f):
            raise MistralError(f"{path}: shard {f.name} is missing")
        out.update(read_tensors(inside(path, f.name)))  # a weights file may not link elsewhere
    return out


# The vision tower's tensors in a vision-language folder of Mistral's own layout.
VISION_PREFIXES = (
    "vision_encoder.",
    "vision_language_adapter.",
    "patch_merger.",
    "pre_mm_projector_norm.",
)


# Mistral Small 4's consolidated files hold a layer's router and experts beside its attention
# (layers.N.gate, layers.N.experts.E.w1, layers.N.shared_experts.w1), not under feed_forward.
_BESIDE = re.compile(r"(layers\.\d+\.)(gate|experts|shared_experts)\.")
_UNDER = re.compile(r"(layers\.\d+\.)feed_forward\.(gate|experts|shared_experts)\.")


def spec_names(tensors: Tensors) -> Tensors:
    """A consolidated file's names as the spec's: experts beside attention moved under
    feed_forward."""
    return {_BESIDE.sub(r"\1feed_forward.\2.", k, count=1): t for k, t in tensors.items()}


def mistral_names(args: ModelArgs, tensors: Tensors) -> Tensors:
    """The spec's names as Mistral's consolidated files spell them: a latent-attention model's
    experts beside its attention (Mistral Small 4), Mixtral's under feed_forward."""
    if not args.mla:
        return tensors
    return {_UNDER.sub(r"\1\2.", k, count=1): t for k, t in tensors.items()}


def read_mistral(path: Path) -> tuple[ModelArgs, Tensors]:
    params = read_json(path / "params.json")
    fp8 = False
    if isinstance(params, dict) and "quantization" in params:  # how the weights are stored
        params = dict(params)
        fp8 = mistral_fp8(params.pop("quantization"), str(path / "params.json"))
    args = ModelArgs.from_params(params, str(path / "params.json"))
    if any(path.glob("consolidated*.safetensors")):
        tensors = read_safetensors_set(path, "consolidated")
    elif (path / "consolidated.00.pth").exists():
        tensors = read_pth(inside(path, "consolidated.00.pth"))
    else:
        raise MistralError(f"{path}: params.json but no consolidated.safetensors or .00.pth")
    if isinstance(params, dict) and any(k in params for k in VISION_KEYS):  # run: the decoder
        tensors = {k: t for k, t in tensors.items() if not k.startswith(VISION_PREFIXES)}
    if fp8:
        tensors = gather_mistral_fp8(tensors, str(path))
    return args, spec_names(tensors)


def without_prediction_layers(config: dict, raw: Tensors, path: Path) -> Tensors:
    """DeepSeek-V3's folders hold num_nextn_predict_layers multi-token prediction layers past
    the model's (model.layers.61 of 61), for training and speculation: left unread, as
    transformers leaves them, and said in one line."""
    extra = (
        config.get("num_nextn_predict_layers") if config.get("model_type") == "deepseek_v3" else 0
    )
    n = config.get("num_hidden_layers")
    if not extra or not isinstance(n, int):
        return raw
    past = re.compile(r"model\.layers\.(\d+)\.")
    kept = {k: t for k, t in raw.items() if not ((m := past.match(k)) and int(m.group(1)) >= n)}
    if len(kept) < len(raw):
        warnings.warn(
            f"{path}: its multi-token prediction layers (model.layers.{n}+) are left unread, "
            "as transformers leaves them",
            stacklevel=4,
        )
    return kept


def read_hf(path: Path) -> tuple[ModelArgs, Tensors]:
    config = read_json(path / "config.json")
    args = hf_config.args_from_config(config, str(path / "config.json"))
    raw = without_prediction_layers(config, read_safetensors_set(path, "model"), path)
    quantization = config.get("quantization")  # mlx-lm's (it writes quantization_config too)
    fp8 = fp8_block(config.get("quantization_config"), str(path / "config.json"))
    multimodal = hf_config.is_multimodal(config)
    tensors = hf.tensors_from_hf(args, raw, str(path), multimodal, quantization, fp8)
    if args.tied_embeddings and "output.weight" in tensors:  # as transformers: the stored one
        args = dataclasses.replace(args, tied_embeddings=False)
    return args, tensors


def read_mlx(path: Path) -> tuple[ModelArgs, Tensors]:
    """mlx-examples wrote either naming, Mistral's or Hugging Face's: the names say which."""
    config = path / "params.json"
    args = read_config(config if config.is_file() else path / "config.json")
    raw: Tensors = {}
    for f in sorted(path.glob("weights*.npz")):
        raw.update(read_npz(inside(path, f.name)))
    for f in sorted(path.glob("weights*.safetensors")):
        raw.update(read_tensors(inside(path, f.name)))
    if any(hf.from_hf_name(name) for name in raw):
        return args, hf.tensors_from_hf(args, raw, str(path))
    return args, raw


@dataclass(frozen=True)
class Layout:
    name: str
    found: Callable[[Path], bool]  # whether a folder has this layout's files
    read: Callable[[Path], tuple[ModelArgs, Tensors]]


LAYOUTS = (
    Layout(
        "mlx-examples",
        lambda p: any(p.glob("weights*.npz")) or any(p.glob("weights*.safetensors")),
        read_mlx,
    ),
    # present(): a params.json that links in a circle or to nothing is named, not skipped
    Layout("mistral", lambda p: present(p / "params.json"), read_mistral),
    Layout("hf", lambda p: present(p / "config.json"), read_hf),
)


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Reads a folder by the first layout whose files it has (tensors stay memory-mapped); a
    Hugging Face repo id ("org/name") that names no folder here is resolved through the hub."""
    if hub.is_repo_id(str(path)):
        path = hub.resolve(str(path))
    path = Path(path)
    if not path.is_dir():
        raise MistralError(f"{path}: not a model folder")
    layout = next((x for x in LAYOUTS if x.found(path)), None)
    if layout is None:
        raise MistralError(
            f"{path}: no known checkpoint format (params.json + consolidated.safetensors, "
            "config.json + model.safetensors, or weights.npz)"
        )
    args, tensors = layout.read(path)
    for name, t in tensors.items():  # codes the folder does not say how to read
        if isinstance(t, RawTensor) and t.dtype not in DTYPES:
            raise MistralError(
                f"{path}: {name} is {t.dtype} codes, but the config declares no quantization "
                "that reads them"
            )
    return Checkpoint(path, layout.name, args, tensors)


def write_checkpoint(
    path: str | Path,
    fmt: str,
    args: ModelArgs,
    tensors: dict[str, RawTensor],
    dtype: str | None = None,
    progress: Callable[[int], None] | None = None,
    quantize: Quantization | None = None,
) -> None:
    """Writes a folder in ``fmt``, streaming tensor by tensor (cast to ``dtype`` if given; in
    mlx-lm's layout, affine-quantized as mlx-lm quantizes if ``quantize`` is given)."""
    if fmt not in FORMATS:
        raise MistralError(f"unknown format {fmt!r}: use {', '.join(FORMATS)}")
    if any(isinstance(t, QuantizedTensor | FP8Tensor) for t in tensors.values()):
        raise MistralError("the weights are quantized: converting them is not supported yet")
    if dtype is not None and dtype not in DTYPES:
        raise MistralError(f"unknown dtype {dtype!r}: use {', '.join(DTYPES)}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    out_dtype = dtype or next(iter(tensors.values())).dtype
    if quantize is not None and fmt != "mlx":
        raise MistralError("--quantize writes mlx-lm's layout (--to mlx)")
    if fmt in ("hf", "mlx"):  # mlx-lm reads (and writes) Hugging Face's layout
        config = hf_config.config_from_args(args, out_dtype)
        deepseek = config["model_type"] in ("deepseek_v2", "deepseek_v3")
        if fmt == "mlx" and deepseek and "rope_parameters" in config:
            config["rope_scaling"] = config["rope_parameters"]  # where mlx-lm reads YaRN
        named = list(hf.tensors_to_hf(args, tensors, fused=quantize is None).items())
        if quantize is not None:  # cast first, then quantized, as mlx-lm's convert does
            block = {
                "group_size": quantize.group_size,
                "bits": quantize.bits,
                "mode": quantize.mode,
            }
            config |= {"quantization": block, "quantization_config": block}
            if args.moe:  # mlx-lm quantizes a layer's experts stacked (switch_mlp)
                named = hf.stack_experts(args, named)
            kind = config["model_type"]
            if kind in ("deepseek_v3", "mistral4"):  # kv_b_proj as two halves (mlx-lm's sanitize)
                named = absorbed.split_halves(args, named)
            whole = (".mlp.gate.weight",) if kind in ("deepseek_v2", "deepseek_v3") else ()
            named = quant.quantized_items(named, quantize, dtype, whole)
            dtype = None
        (path / "config.json").write_text(json.dumps(config, indent=2))
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
        items = list(mistral_names(args, tensors).items())
        write_tensors(path / "consolidated.safetensors", items, dtype, progress)
    elif out_dtype == "bfloat16":  # numpy's .npy has no bfloat16: MLX reads safetensors as well
        write_tensors(path / "weights.safetensors", items, dtype, progress)
    else:
        _write_npz(path / "weights.npz", items, dtype, progress)


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
