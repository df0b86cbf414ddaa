"""Hugging Face's layout: config.json keys, tensor names, and the q/k row permutation.

Mistral checkpoints rotate adjacent pairs (x[2i], x[2i+1]); Hugging Face rotates halves
(x[i], x[i+d/2]) and stores the rows of wq and wk permuted to match. Per head of d rows, HF row i
holds Mistral row 2i and HF row d/2 + i holds Mistral row 2i + 1.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from mistral import absorbed, hf_latent, quant
from mistral.args import ModelArgs
from mistral.errors import MistralError
from mistral.fp8 import FP8Tensor, gather_fp8
from mistral.quant import QuantizedTensor
from mistral.weights import RawTensor, StackedTensor

# A mistral3 folder's names: the decoder under a prefix, the vision tower and projector beside it
# (transformers 5 writes model.language_model.*, earlier releases language_model.model.*).
_DECODER_PREFIXES = [
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
]
_VISION_PREFIXES = (
    "vision_tower.",
    "multi_modal_projector.",
    "model.vision_tower.",
    "model.multi_modal_projector.",
)

# Mistral key pattern <-> Hugging Face key pattern ({i} = layer, {e} = expert).
_NAMES = [
    ("tok_embeddings.weight", "model.embed_tokens.weight"),
    ("norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
    ("layers.{i}.attention.wq.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("layers.{i}.attention.wk.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("layers.{i}.attention.wv.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("layers.{i}.attention.wo.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("layers.{i}.attention_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("layers.{i}.feed_forward.w1.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("layers.{i}.feed_forward.w2.weight", "model.layers.{i}.mlp.down_proj.weight"),
    ("layers.{i}.feed_forward.w3.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("layers.{i}.feed_forward.gate.weight", "model.layers.{i}.block_sparse_moe.gate.weight"),
    (
        "layers.{i}.feed_forward.experts.{e}.w1.weight",
        "model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight",
    ),
    (
        "layers.{i}.feed_forward.experts.{e}.w2.weight",
        "model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight",
    ),
    (
        "layers.{i}.feed_forward.experts.{e}.w3.weight",
        "model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight",
    ),
]
# Latent attention and DeepSeekMoE (deepseek_v2, deepseek_v3, mistral4): experts under mlp.
_LATENT_NAMES = [
    ("layers.{i}.attention.wq_a.weight", "model.layers.{i}.self_attn.q_a_proj.weight"),
    ("layers.{i}.attention.q_a_norm.weight", "model.layers.{i}.self_attn.q_a_layernorm.weight"),
    ("layers.{i}.attention.wq_b.weight", "model.layers.{i}.self_attn.q_b_proj.weight"),
    (
        "layers.{i}.attention.wkv_a_with_mqa.weight",
        "model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight",
    ),
    ("layers.{i}.attention.kv_a_norm.weight", "model.layers.{i}.self_attn.kv_a_layernorm.weight"),
    ("layers.{i}.attention.wkv_b.weight", "model.layers.{i}.self_attn.kv_b_proj.weight"),
    ("layers.{i}.feed_forward.gate.weight", "model.layers.{i}.mlp.gate.weight"),
    (
        "layers.{i}.feed_forward.gate.e_score_correction_bias",
        "model.layers.{i}.mlp.gate.e_score_correction_bias",
    ),
    *[
        (
            f"layers.{{i}}.feed_forward.{part}.{w}.weight",
            f"model.layers.{{i}}.mlp.{hf}.{proj}.weight",
        )
        for part, hf in (("experts.{e}", "experts.{e}"), ("shared_experts", "shared_experts"))
        for w, proj in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj"))
    ],
]


def _pattern(template: str) -> re.Pattern:
    body = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
    return re.compile(body + "$")


_TO_HF = [(_pattern(m), h) for m, h in _NAMES]
_TO_HF_LATENT = [(_pattern(m), h) for m, h in _LATENT_NAMES + _NAMES]
_FROM_HF = [(_pattern(h), m) for m, h in _NAMES + _LATENT_NAMES]


def _rename(name: str, table: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, template in table:
        if match := pattern.match(name):
            return template.format(**match.groupdict())
    return None


def to_hf_name(name: str, latent: bool = False) -> str | None:
    return _rename(name, _TO_HF_LATENT if latent else _TO_HF)


def from_hf_name(name: str) -> str | None:
    return _rename(name, _FROM_HF)


def permute_rows(t: RawTensor, n_heads: int, to_hf: bool) -> RawTensor:
    """Reorders the rows of wq/wk between pair order (Mistral) and half order (HF), lazily."""
    rows = t.shape[0]
    d = rows // n_heads
    if to_hf:  # HF row (h, half, i) is Mistral row (h, i, half)
        order = np.arange(rows).reshape(n_heads, d // 2, 2).transpose(0, 2, 1)
    else:  # Mistral row (h, i, half) is HF row (h, half, i)
        order = np.arange(rows).reshape(n_heads, 2, d // 2).transpose(0, 2, 1)
    return t.reorder_rows(order.reshape(-1))


def halves_to_pairs(x: np.ndarray) -> np.ndarray:
    """Activations rotated in HF's half order (x[i], x[i + D/2]) put in Mistral's pair order."""
    D = x.shape[-1]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = x[..., : D // 2], x[..., D // 2 :]
    return out


def decoder_tensors(tensors: Mapping[str, RawTensor]) -> dict[str, RawTensor]:
    """A mistral3 folder's text decoder under the text model's own names (vision left out)."""
    out = {}
    for name, t in tensors.items():
        if name.startswith(_VISION_PREFIXES):
            continue
        for prefix, to in _DECODER_PREFIXES:
            if name.startswith(prefix):
                name = to + name.removeprefix(prefix)
                break
        out[name] = t
    return out


def tensors_from_hf(
    args: ModelArgs,
    tensors: Mapping[str, RawTensor],
    source: str,
    multimodal: bool = False,
    quantization: dict[str, Any] | None = None,
    fp8: tuple[int, int] | None = None,
) -> dict[str, RawTensor | QuantizedTensor | FP8Tensor]:
    """Renames HF tensors to checkpoint keys and un-permutes wq/wk (lazily); of a mistral3
    folder (``multimodal``), the text decoder's; of an mlx-lm quantized folder (its config's
    ``quantization``), each packed weight with its scales and biases as one QuantizedTensor."""
    tensors = unstack_experts(tensors, source)  # codes and their scales alike
    if args.mla:  # mlx-lm's deepseek_v3 and mistral4 hold kv_b_proj as two halves
        tensors = absorbed.join_halves(args, tensors, quantization, source)
    if fp8 is not None:  # Hugging Face's FP8: e4m3 codes with a weight_scale_inv per block
        tensors = gather_fp8(tensors, fp8, source)
    elif quantization is not None:  # mlx-lm's, its per-layer choices for each expert too
        default, layers = quant.config_quantization(quantization, source)
        n = args.moe.num_experts if args.moe else 0
        tensors = quant.gather(tensors, default, unstack_layers(layers, n), source)
    elif any(k.endswith((".scales", ".biases")) for k in tensors):
        first = next(k for k in tensors if k.endswith((".scales", ".biases")))
        raise MistralError(f"{source}: {first} but the config has no quantization block")
    if multimodal:
        tensors = decoder_tensors(tensors)
    out = {}
    unknown = []
    rows = {"wq": args.n_heads, "wk": args.n_kv_heads}
    for name, t in tensors.items():
        key = from_hf_name(name)
        if key is None:
            unknown.append(name)
            continue
        if args.mla and key.endswith("attention.wq.weight"):
            pass  # latent attention's RoPE part is stored in pair order (rope_interleave)
        elif key.endswith(("attention.wq.weight", "attention.wk.weight")):
            heads = rows[key.split(".")[-2]]
            want = (heads * args.head_dim, args.dim)
            if t.shape != want:  # checked before the rows are reordered (an index that size)
                raise MistralError(f"{source}: {name} is {t.shape}, the config needs {want}")
            t = permute_rows(t, heads, to_hf=False)
        out[key] = t
    if unknown:
        more = f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise MistralError(f"{source}: unexpected tensors {', '.join(unknown[:5])}{more}")
    return out


# mlx-lm's experts stacked per layer: Mixtral's (its experts named w1, w2, w3) and DeepSeekMoE's
_SWITCH = re.compile(
    r"(model\.layers\.\d+\.(block_sparse_moe|mlp)\.)switch_mlp\.(\w+)\.(weight|scales|biases)$"
)
_SWITCH_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


def expert_name(block: str, projection: str) -> str:
    """An expert's projection under transformers' name: w1/w2/w3 in a Mixtral."""
    return _SWITCH_NAMES[projection] if block == "block_sparse_moe" else projection


# transformers' mistral4 writes each layer's experts fused: gate_up_proj (E, 2 hidden, dim),
# gate rows first, and down_proj (E, dim, hidden); in FP8 with one scale per expert (E, 1, 1)
# and static input scales (E,) beside them (under a mistral3 folder's prefix too).
_FUSED = re.compile(r"(.*\.mlp\.experts\.)(gate_up_proj|down_proj)(_scale_inv|_activation_scale)?$")
_FUSED_PARTS = {None: ".weight", "_scale_inv": ".weight_scale_inv"}
_FUSED_PARTS["_activation_scale"] = ".activation_scale"


def unstack_experts(tensors: Mapping[str, RawTensor], source: str) -> dict[str, RawTensor]:
    """Experts stored stacked, (E, out, in), split into one tensor each: mlx-lm's Mixtral
    switch_mlp (codes, scales and biases alike) and transformers' fused mistral4 experts (their
    FP8 scales alike, an expert's gate and up rows sharing theirs)."""
    out = {}
    for name, t in tensors.items():
        match = _FUSED.match(name)
        codes = None if match is None else tensors.get(match.group(1) + match.group(2))
        if match and codes is not None and len(codes.shape) == 3:  # else: named as unexpected
            prefix, kind, part = match.groups()
            if t.shape[:1] != codes.shape[:1]:
                raise MistralError(f"{source}: {name} is not one per expert of {prefix + kind}")
            suffix, half = _FUSED_PARTS[part], codes.shape[1] // 2
            for e in range(t.shape[0]):
                if kind == "down_proj":
                    out[f"{prefix}{e}.down_proj{suffix}"] = RawTensor(t.dtype, t.data[e])
                    continue
                gate, up = (
                    (t.data[e, :half], t.data[e, half:]) if part is None else (t.data[e],) * 2
                )
                out[f"{prefix}{e}.gate_proj{suffix}"] = RawTensor(t.dtype, gate)
                out[f"{prefix}{e}.up_proj{suffix}"] = RawTensor(t.dtype, up)
            continue
        match = _SWITCH.match(name)
        if match is None or match.group(3) not in _SWITCH_NAMES or len(t.shape) != 3:
            out[name] = t  # (named as unexpected)
            continue
        prefix, block, projection, part = match.groups()
        w = expert_name(block, projection)
        for e in range(t.shape[0]):  # (quantized: codes, scales and biases alike)
            out[f"{prefix}experts.{e}.{w}.{part}"] = RawTensor(t.dtype, t.data[e])
    return out


def stack_experts(args: ModelArgs, items: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """Each layer's experts stacked as mlx-lm's switch_mlp, (E, out, in), in the place of its
    first expert (the order mlx-lm writes them in): Mixtral's and DeepSeekMoE's."""
    assert args.moe is not None
    names = {v: k for k, v in _SWITCH_NAMES.items()}  # w1 -> gate_proj
    tensors, out = dict(items), []
    n = args.moe.num_experts
    for name, t in items:
        match = _EXPERT.match(name)
        if match is None:
            out.append((name, t))
        elif match.group(2) == "0":
            p, w = match.group(1), match.group(3)
            parts = tuple((tensors[f"{p}experts.{e}.{w}.weight"],) for e in range(n))
            out.append((f"{p}switch_mlp.{names.get(w, w)}.weight", StackedTensor(t.dtype, parts)))
    return out


_EXPERT = re.compile(
    r"(model\.layers\.\d+\.(?:block_sparse_moe|mlp)\.)experts\.(\d+)\."
    r"(w[123]|gate_proj|down_proj|up_proj)\.weight$"
)


def unstack_layers(layers: dict[str, Any], n_experts: int) -> dict[str, Any]:
    """mlx-lm's per-layer quantization keyed by module path, a switch_mlp's for each expert."""
    out = dict(layers)
    for path, q in layers.items():
        match = re.match(r"(model\.layers\.\d+\.(block_sparse_moe|mlp)\.)switch_mlp\.(\w+)$", path)
        if match and match.group(3) in _SWITCH_NAMES:
            w = expert_name(match.group(2), match.group(3))
            out |= {f"{match.group(1)}experts.{e}.{w}": q for e in range(n_experts)}
    return out


def tensors_to_hf(
    args: ModelArgs, tensors: Mapping[str, RawTensor], fused: bool = True
) -> dict[str, RawTensor]:
    """Checkpoint keys to HF names, permuting wq/wk rows into half order (lazily); a mistral4's
    experts fused as transformers reads them, unless not ``fused`` (one by one, for stacking)."""
    out = {}
    for key, t in tensors.items():
        if args.mla:
            pass  # latent attention keeps pair order (rope_interleave)
        elif key.endswith("attention.wq.weight"):
            t = permute_rows(t, args.n_heads, to_hf=True)
        elif key.endswith("attention.wk.weight"):
            t = permute_rows(t, args.n_kv_heads, to_hf=True)
        name = to_hf_name(key, args.mla)
        if name is None:
            raise MistralError(f"{key} has no Hugging Face name: not a tensor of the spec")
        out[name] = t
    mistral4 = args.mla and hf_latent.model_type(args) == "mistral4"
    return fuse_experts(args, out) if mistral4 and fused else out


def fuse_experts(args: ModelArgs, tensors: dict[str, RawTensor]) -> dict[str, Any]:
    """transformers' mistral4 reads each layer's experts fused (it ignores them one by one):
    gate_up_proj (E, 2 hidden, dim) and down_proj (E, dim, hidden), stacked as written."""
    assert args.moe is not None
    out: dict[str, Any] = {}
    n = args.moe.num_experts
    for name, t in tensors.items():
        match = re.match(r"(model\.layers\.\d+\.mlp\.experts\.)0\.gate_proj\.weight$", name)
        if match:
            p = match.group(1)
            up = [
                (tensors[f"{p}{e}.gate_proj.weight"], tensors[f"{p}{e}.up_proj.weight"])
                for e in range(n)
            ]
            out[p + "gate_up_proj"] = StackedTensor(t.dtype, tuple(up))
            down = tuple((tensors[f"{p}{e}.down_proj.weight"],) for e in range(n))
            out[p + "down_proj"] = StackedTensor(t.dtype, down)
        elif ".mlp.experts." not in name:
            out[name] = t
    return out
