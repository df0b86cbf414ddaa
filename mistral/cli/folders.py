"""The commands about model folders: info and convert."""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import simple_parsing as sp
from tqdm import tqdm

from mistral.args import ModelArgs
from mistral.chat import template_version
from mistral.checkpoint import CONFIGS, FORMATS, read_checkpoint, write_checkpoint
from mistral.errors import MistralError
from mistral.fp8 import FP8Tensor
from mistral.hf_tokenizer import tokenizer_files
from mistral.quant import FLOAT_MODES, MODES, Quantization, QuantizedTensor
from mistral.tokenizer import Tokenizer
from mistral.weights import cached_numbers, cast_nbytes, check_tensors


@dataclass
class Info:
    """Describe a model folder: format, architecture, parameters, dtype, bytes, tokenizer."""

    path: str = sp.field(positional=True)
    """Model folder."""
    json: bool = False
    """Print JSON instead of text."""

    def run(self) -> None:
        ckpt = read_checkpoint(self.path)
        # Before describing the args: a config claiming 1e9 layers is refused, not listed.
        check_tensors(ckpt.args, {k: t.shape for k, t in ckpt.tensors.items()}, str(ckpt.path))
        params = sum(int(np.prod(t.shape)) for t in ckpt.tensors.values())
        dtypes = sorted({t.dtype for t in ckpt.tensors.values()})
        info = {
            "path": str(ckpt.path),
            "format": ckpt.format,
            "args": ckpt.args.to_params(),
            "parameters": params,
            "dtype": ",".join(dtypes),
            "bytes": sum(t.nbytes for t in ckpt.tensors.values()),
            "quantization": quantization_of(ckpt.tensors),
            "cache_bytes_per_token": cache_per_token(ckpt.args),
            "tokenizer": None,
        }
        if ckpt.tokenizer_path:
            tok = Tokenizer(ckpt.tokenizer_path)
            info["tokenizer"] = {
                "file": ckpt.tokenizer_path.name,
                "vocab_size": tok.vocab_size,
                "chat_template": template_version(tok),
            }
        if self.json:
            print(json.dumps(info, indent=2))
            return
        a = ckpt.args
        print(f"{ckpt.path}  ({ckpt.format} format)")
        heads = f"{a.n_heads} heads" if a.mla else f"{a.n_heads} heads / {a.n_kv_heads} kv heads"
        shape = f"{a.n_layers} layers, dim {a.dim}, {heads} of {a.head_dim}, hidden {a.hidden_dim}"
        print(f"  architecture  {shape}{'' if a.moe else ', dense'}")
        if a.moe:
            print(f"  experts       {describe_experts(a)}")
        tied = ", tied to the embeddings" if a.tied_embeddings else ""
        print(f"  vocabulary    {a.vocab_size}{tied}")
        print(f"  attention     {describe_attention(a)}, norm_eps {a.norm_eps:g}")
        print(f"  rope          {describe_rope(a)}")
        seven = cache_per_token(ModelArgs.from_file(CONFIGS / "mistral-7b-v0.1.json"))
        per_token = info["cache_bytes_per_token"]
        size = f"{per_token:,} bytes" if per_token < 1024 else f"{per_token / 1024:,.1f} KiB"
        seven_kib = f"Mistral 7B: {seven // 1024} KiB"
        print(f"  cache         {size} per token in bfloat16 over the layers ({seven_kib})")
        print(f"  parameters    {params:,} ({params / 1e6:,.1f} M)")
        print(f"  weights       {info['dtype']}, {info['bytes'] / 2**20:,.1f} MiB")
        for kind, n in info["quantization"].items():
            print(f"  quantized     {n} weights {kind}")
        t = info["tokenizer"]
        if t:
            tokens = f"{t['vocab_size']} tokens, chat template {t['chat_template']}"
            print(f"  tokenizer     {t['file']}, {tokens}")
        else:
            print("  tokenizer     none found")


def quantization_of(tensors: dict) -> dict[str, int]:
    """How many weights are quantized how: {"4-bit affine, groups of 64": 29, ...}."""
    kinds = [
        f"{t.q.bits}-bit {t.q.mode}, groups of {t.q.group_size}"
        for t in tensors.values()
        if isinstance(t, QuantizedTensor)
    ]
    kinds += [
        f"fp8 e4m3, blocks of {min(t.block[0], t.shape[0])}x{min(t.block[1], t.shape[1])}"
        for t in tensors.values()
        if isinstance(t, FP8Tensor)
    ]
    return {k: kinds.count(k) for k in sorted(set(kinds))}


def cache_per_token(args: ModelArgs) -> int:
    """Bytes the caches of every layer hold per token in bfloat16 (a windowed layer's too,
    until it fills): keys and values, or latent attention's latent and RoPE key."""
    return cached_numbers(args) * args.n_layers * 2


def describe_experts(a: ModelArgs) -> str:
    """'MoE 8x, top-2', with DeepSeekMoE's shared experts, dense layers and routing."""
    m = a.moe
    assert m is not None
    out = f"MoE {m.num_experts}x, top-{m.num_experts_per_tok}"
    if m.expert_hidden_dim:
        out += f" of hidden {m.expert_hidden_dim}"
    if m.num_shared_experts:
        out += f", {m.num_shared_experts} shared"
    if m.first_k_dense_replace:
        out += f", first {m.first_k_dense_replace} layer(s) dense"
    if m.scoring_func != "softmax" or not m.norm_topk_prob or m.routed_scale != 1:
        norm = "normalized" if m.norm_topk_prob else "unnormalized"
        out += f", {m.scoring_func} scores {norm} x{m.routed_scale:g}"
    if m.num_expert_groups > 1:
        g = m.num_expert_groups
        out += f", best {m.num_expert_groups_per_tok} of {g} groups by {m.group_scoring}"
    return out


def describe_attention(a: ModelArgs) -> str:
    windows = describe_windows(a.layer_windows())
    if not a.mla:
        return windows
    q = "queries direct" if a.q_lora_rank is None else f"query rank {a.q_lora_rank}"
    parts = f"{a.qk_nope_head_dim} + rope {a.qk_rope_head_dim}, v {a.v_head_dim}"
    return f"latent (kv rank {a.kv_lora_rank}, {q}; heads {parts}), {windows}"


def describe_windows(windows: list[int | None]) -> str:
    """'sliding window 4096 in every layer', or how many layers attend over which window."""
    counts = {w: windows.count(w) for w in dict.fromkeys(windows)}
    name = {w: "full" if w is None else f"window {w}" for w in counts}
    if len(counts) == 1:
        (w,) = counts
        return "full attention in every layer" if w is None else f"sliding {name[w]}, every layer"
    return ", ".join(f"{n} layers {name[w]}" for w, n in counts.items())


def describe_rope(a: ModelArgs) -> str:
    out = f"theta {a.rope_theta:g}"
    if a.yarn:
        y = a.yarn
        scale = "q/k scaled" if y.apply_scale else "no magnitude scale"
        if y.mscale_all_dim is not None:
            scale += f", softmax x mscale({y.mscale_all_dim:g})^2"
        orig = y.original_max_position_embeddings
        out += f", YaRN x{y.factor:g} of {orig} (beta {y.beta:g}, alpha {y.alpha:g}, {scale})"
    if a.llama_4_scaling:
        s = a.llama_4_scaling
        periods = s.original_max_position_embeddings
        out += f", queries scaled by 1 + {s.beta:g} ln(1 + floor(pos / {periods}))"
    return out


@dataclass
class Convert:
    """Convert a model folder to another layout, tensor by tensor (round trips are bit-exact)."""

    src: str = sp.field(positional=True)
    """Source model folder."""
    dst: str = sp.field(positional=True)
    """Destination folder (must not exist, or be empty)."""
    to: str = sp.choice(*FORMATS, default="mistral")
    """Layout to write: mistral (params.json + consolidated.safetensors), hf (config.json +
    model.safetensors, wq/wk permuted, tokenizer.json), mlx (the same layout, which mlx-lm reads
    and writes), mlx-examples (the older params.json + weights.npz of mlx-examples' scripts)."""
    dtype: str | None = sp.choice("float32", "bfloat16", "float16", default=None)
    """Cast the weights. Default: keep them as they are."""
    quantize: int | None = None
    """With --to mlx: quantize the weights to this many bits (2, 3, 4, 5, 6 or 8), affine, the
    same packed codes that mlx-lm's own convert writes from the same model."""
    group_size: int | None = None
    """With --quantize: inputs per group of one scale (32, 64 or 128). Default: 64 (affine); the
    float modes have their own (32; nvfp4 16)."""
    mode: str = sp.choice(*MODES, default="affine")
    """With --quantize: affine (codes, scales and biases), mxfp4 (4-bit E2M1 codes times a power
    of two per group of 32), mxfp8 (8-bit E4M3 codes, the same scales) or nvfp4 (E2M1 codes
    times an E4M3 scale per group of 16), as mx.quantize writes them."""

    def run(self) -> None:
        q = None
        if self.quantize is not None:
            group = self.group_size or FLOAT_MODES.get(self.mode, (0, 64))[1]
            q = Quantization(self.quantize, group, self.mode)
        ckpt = read_checkpoint(self.src)
        # Checked before anything is written: the tensors the spec needs, the tokenizer files.
        check_tensors(ckpt.args, {k: t.shape for k, t in ckpt.tensors.items()}, str(ckpt.path))
        tokenizers = ckpt.tokenizer_files
        dst = Path(self.dst)
        if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
            raise MistralError(f"{dst} exists and is not empty: choose a new folder")
        total = sum(cast_nbytes(t, self.dtype) for t in ckpt.tensors.values()) if not q else None
        # Written beside the destination and moved there whole: an interrupted or failed
        # conversion leaves no folder that looks finished.
        partial = dst.with_name(f".{dst.name}.partial-{os.getpid()}")
        try:
            desc = f"{ckpt.format} -> {self.to}"
            with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=None) as bar:
                write_checkpoint(
                    partial, self.to, ckpt.args, ckpt.tensors, self.dtype, bar.update, q
                )
            for path in tokenizers:
                shutil.copy(path, partial / path.name)
            if tokenizers and self.to in ("hf", "mlx"):  # what AutoTokenizer and mlx-lm read
                for name, body in tokenizer_files(Tokenizer(tokenizers[0])).items():
                    (partial / name).write_text(json.dumps(body, ensure_ascii=False) + "\n")
            if dst.is_dir():
                dst.rmdir()  # empty, checked above
            partial.rename(dst)
        except OSError as e:
            raise MistralError(f"cannot write {dst} ({e.strerror or e})") from None
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        print(f"wrote {dst} ({self.to} format)", file=sys.stderr)
