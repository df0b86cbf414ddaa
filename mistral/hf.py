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

from mistral.args import DEFAULT_ROPE_THETA, ModelArgs, MoeArgs
from mistral.errors import MistralError
from mistral.weights import RawTensor

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


def _pattern(template: str) -> re.Pattern:
    body = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
    return re.compile(body + "$")


_TO_HF = [(_pattern(m), h) for m, h in _NAMES]
_FROM_HF = [(_pattern(h), m) for m, h in _NAMES]


def _rename(name: str, table: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, template in table:
        if match := pattern.match(name):
            return template.format(**match.groupdict())
    return None


def to_hf_name(name: str) -> str | None:
    return _rename(name, _TO_HF)


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


def args_from_config(config: dict[str, Any], source: str = "config.json") -> ModelArgs:
    """Maps a Mistral/Mixtral config.json to ModelArgs, refusing what the spec lacks."""
    try:
        return _args_from_config(config, source)
    except (TypeError, ValueError, ZeroDivisionError, AttributeError) as e:
        raise MistralError(f"{source}: malformed config ({type(e).__name__}: {e})") from None


def _args_from_config(config: dict[str, Any], source: str) -> ModelArgs:
    kind = config.get("model_type")
    if kind not in ("mistral", "mixtral"):
        raise MistralError(f"{source}: model_type {kind!r} is not mistral or mixtral")
    if config.get("hidden_act", "silu") != "silu":
        raise MistralError(f"{source}: hidden_act {config['hidden_act']!r} is not silu")
    if config.get("tie_word_embeddings"):
        raise MistralError(f"{source}: tied embeddings are not part of the Mistral architecture")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise MistralError(f"{source}: rope scaling {rope!r} is not supported")
    theta = rope.get("rope_theta", config.get("rope_theta", DEFAULT_ROPE_THETA))
    try:
        n_heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // n_heads  # HF's own rule
        moe = None
        if kind == "mixtral":
            moe = MoeArgs(config["num_local_experts"], config["num_experts_per_tok"])
        return ModelArgs(
            dim=config["hidden_size"],
            n_layers=config["num_hidden_layers"],
            head_dim=head_dim,
            hidden_dim=config["intermediate_size"],
            n_heads=n_heads,
            n_kv_heads=config.get("num_key_value_heads") or n_heads,
            norm_eps=config["rms_norm_eps"],
            vocab_size=config["vocab_size"],
            rope_theta=float(theta),
            sliding_window=config.get("sliding_window"),
            moe=moe,
        )
    except KeyError as e:
        raise MistralError(f"{source}: missing key {e.args[0]}") from None
    except MistralError as e:
        raise MistralError(f"{source}: {e}") from None


def config_from_args(args: ModelArgs, dtype: str) -> dict[str, Any]:
    """The config.json transformers expects for these args."""
    moe = args.moe
    config: dict[str, Any] = {
        "architectures": ["MixtralForCausalLM" if moe else "MistralForCausalLM"],
        "model_type": "mixtral" if moe else "mistral",
        "hidden_size": args.dim,
        "num_hidden_layers": args.n_layers,
        "head_dim": args.head_dim,
        "intermediate_size": args.hidden_dim,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "rms_norm_eps": args.norm_eps,
        "vocab_size": args.vocab_size,
        "rope_theta": args.rope_theta,
        "sliding_window": args.sliding_window,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "max_position_embeddings": 32768,
        "torch_dtype": dtype,
    }
    if moe:
        config["num_local_experts"] = moe.num_experts
        config["num_experts_per_tok"] = moe.num_experts_per_tok
    return config


def tensors_from_hf(
    args: ModelArgs, tensors: Mapping[str, RawTensor], source: str
) -> dict[str, RawTensor]:
    """Renames HF tensors to checkpoint keys and un-permutes wq/wk (lazily)."""
    quantized = [k for k in tensors if k.endswith((".scales", ".biases"))]
    if quantized:
        raise MistralError(f"{source}: quantized checkpoints are not supported ({quantized[0]})")
    out = {}
    unknown = []
    for name, t in unstack_experts(tensors).items():
        key = from_hf_name(name)
        if key is None:
            unknown.append(name)
            continue
        if key.endswith("attention.wq.weight"):
            t = permute_rows(t, args.n_heads, to_hf=False)
        elif key.endswith("attention.wk.weight"):
            t = permute_rows(t, args.n_kv_heads, to_hf=False)
        out[key] = t
    if unknown:
        more = f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise MistralError(f"{source}: unexpected tensors {', '.join(unknown[:5])}{more}")
    return out


_SWITCH = re.compile(r"(model\.layers\.\d+\.block_sparse_moe\.)switch_mlp\.(\w+)\.weight$")
_SWITCH_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


def unstack_experts(tensors: Mapping[str, RawTensor]) -> dict[str, RawTensor]:
    """mlx-lm stores a Mixtral layer's experts stacked, (E, out, in), as switch_mlp: split them."""
    out = {}
    for name, t in tensors.items():
        match = _SWITCH.match(name)
        if match is None or match.group(2) not in _SWITCH_NAMES:
            out[name] = t
            continue
        prefix, w = match.group(1), _SWITCH_NAMES[match.group(2)]
        for e in range(t.shape[0]):
            out[f"{prefix}experts.{e}.{w}.weight"] = RawTensor(t.dtype, t.data[e])
    return out


def tensors_to_hf(args: ModelArgs, tensors: Mapping[str, RawTensor]) -> dict[str, RawTensor]:
    """Checkpoint keys to HF names, permuting wq/wk rows into half order (lazily)."""
    out = {}
    for key, t in tensors.items():
        if key.endswith("attention.wq.weight"):
            t = permute_rows(t, args.n_heads, to_hf=True)
        elif key.endswith("attention.wk.weight"):
            t = permute_rows(t, args.n_kv_heads, to_hf=True)
        name = to_hf_name(key)
        if name is None:
            raise MistralError(f"{key} has no Hugging Face name: not a tensor of the spec")
        out[name] = t
    return out
