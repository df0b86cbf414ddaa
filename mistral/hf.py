"""Hugging Face's layout: config.json keys, tensor names, and the q/k row permutation.

Mistral checkpoints rotate adjacent pairs (x[2i], x[2i+1]); Hugging Face rotates halves
(x[i], x[i+d/2]) and stores the rows of wq and wk permuted to match. Per head of d rows, HF row i
holds Mistral row 2i and HF row d/2 + i holds Mistral row 2i + 1.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from mistral import quant
from mistral.args import DEFAULT_ROPE_THETA, Llama4ScalingArgs, ModelArgs, MoeArgs, YarnArgs
from mistral.errors import MistralError
from mistral.quant import QuantizedTensor
from mistral.rope import yarn_mscale
from mistral.weights import RawTensor

# transformers' model types this reader knows: the text models, and mistral3 (a Pixtral vision
# tower in front of one of them, whose text decoder is read).
TEXT_TYPES = ("mistral", "mixtral", "ministral", "ministral3")
CLASSES = {
    "mistral": "MistralForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "ministral": "MinistralForCausalLM",
    "ministral3": "Ministral3ForCausalLM",
}
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
    """Maps a config.json of transformers' mistral, mixtral, ministral, ministral3 or mistral3
    (its text decoder) to ModelArgs, refusing what the spec lacks."""
    try:
        return _args_from_config(text_config(config, source), source)
    except (TypeError, ValueError, ZeroDivisionError, AttributeError, OverflowError) as e:
        raise MistralError(f"{source}: malformed config ({type(e).__name__}: {e})") from None


def is_multimodal(config: dict[str, Any]) -> bool:
    return config.get("model_type") == "mistral3"


def text_config(config: dict[str, Any], source: str) -> dict[str, Any]:
    """The config of the text model: a mistral3 folder's text_config (which transformers reads
    as mistral unless it says otherwise), whose tying is the outer config's; else the config."""
    if not is_multimodal(config):
        return config
    text = config.get("text_config")
    if not isinstance(text, dict):
        raise MistralError(f"{source}: a mistral3 config without a text_config object")
    warnings.warn(
        f"{source} is a vision-language model (mistral3): its text decoder is loaded, images "
        "are not supported yet",
        stacklevel=4,
    )
    tied = config.get("tie_word_embeddings", True)  # transformers' Mistral3Config default
    return {"model_type": "mistral", **text, "tie_word_embeddings": tied}


def rope_args(
    rope: dict[str, Any], source: str
) -> tuple[YarnArgs | None, Llama4ScalingArgs | None]:
    """transformers' rope_parameters: YaRN (its attention factor as Mistral's apply_scale) and
    Ministral 3's llama_4_scaling_beta."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "yarn"):
        raise MistralError(f"{source}: rope scaling {kind!r} is not supported (default or yarn)")
    yarn = None
    if kind == "yarn":
        if rope.get("truncate", True) is not True or rope.get("partial_rotary_factor", 1) != 1:
            raise MistralError(
                f"{source}: yarn with truncate or partial_rotary_factor is not supported"
            )
        factor = float(rope["factor"])
        attention = rope.get("attention_factor")
        if attention is None:  # transformers' rule
            mscale, all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
            attention = yarn_mscale(factor)
            if mscale and all_dim and factor > 1:
                log = math.log(factor)
                attention = (0.1 * mscale * log + 1) / (0.1 * all_dim * log + 1)
        if math.isclose(attention, 1.0, rel_tol=1e-6):
            apply_scale = False
        elif math.isclose(attention, yarn_mscale(factor), rel_tol=1e-6):
            apply_scale = True
        else:
            raise MistralError(f"{source}: a yarn attention factor of {attention} is not supported")
        yarn = YarnArgs(
            factor=factor,
            original_max_position_embeddings=rope["original_max_position_embeddings"],
            beta=float(rope.get("beta_fast") or 32.0),
            alpha=float(rope.get("beta_slow") or 1.0),
            apply_scale=apply_scale,
        )
    scaling = None
    if rope.get("llama_4_scaling_beta") is not None:
        scaling = Llama4ScalingArgs(
            rope["original_max_position_embeddings"], float(rope["llama_4_scaling_beta"])
        )
    return yarn, scaling


def windows_of(config: dict[str, Any], source: str) -> int | list[int | None] | None:
    """params.json's sliding_window: ministral's layer_types as the shortest repeating pattern
    of windows (None: full attention); the other types window every layer alike."""
    window = config.get("sliding_window")
    types = config.get("layer_types") if config["model_type"] == "ministral" else None
    if types is None:
        return window
    kinds = {"sliding_attention": window, "full_attention": None}
    if not isinstance(types, list) or len(types) != config["num_hidden_layers"]:
        raise MistralError(f"{source}: layer_types must list every layer's attention")
    if any(t not in kinds for t in types):
        raise MistralError(f"{source}: layer_types may say sliding_attention or full_attention")
    pattern = shortest_pattern([kinds[t] for t in types])
    return pattern[0] if len(pattern) == 1 else pattern


def shortest_pattern(windows: list[int | None]) -> list[int | None]:
    """The shortest list that repeated gives ``windows``: [W, None, W, None] -> [W, None]."""
    n = len(windows)
    return next(
        windows[:p] for p in range(1, n + 1) if n % p == 0 and windows[:p] * (n // p) == windows
    )


def _args_from_config(config: dict[str, Any], source: str) -> ModelArgs:
    kind = config.get("model_type")
    if kind not in TEXT_TYPES:
        raise MistralError(f"{source}: model_type {kind!r} is not one of {', '.join(TEXT_TYPES)}")
    if config.get("hidden_act", "silu") != "silu":
        raise MistralError(f"{source}: hidden_act {config['hidden_act']!r} is not silu")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise TypeError(f"rope_parameters must be an object, got {rope!r}")  # malformed
    yarn, scaling = rope_args(rope, source)
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
            sliding_window=windows_of(config, source),
            moe=moe,
            yarn=yarn,
            llama_4_scaling=scaling,
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        )
    except KeyError as e:
        raise MistralError(f"{source}: missing key {e.args[0]}") from None
    except MistralError as e:
        raise MistralError(f"{source}: {e}") from None


def model_type(args: ModelArgs) -> str:
    """The transformers model type that holds these args: mixtral for MoE; ministral3 for YaRN,
    query scaling or tied embeddings; ministral for windows that differ between layers."""
    windows = args.layer_windows()
    mixed = len(set(windows)) > 1
    if len({w for w in windows if w is not None}) > 1:
        raise MistralError(
            "transformers has one sliding window per model, these layers have several"
        )
    newer = args.yarn or args.llama_4_scaling or args.tied_embeddings
    if args.moe:
        if mixed or newer:
            raise MistralError("transformers' mixtral has no per-layer windows, YaRN or tying")
        return "mixtral"
    if newer:
        if mixed:
            raise MistralError("transformers' ministral3 has no per-layer windows")
        y, s = args.yarn, args.llama_4_scaling
        if y and s and y.original_max_position_embeddings != s.original_max_position_embeddings:
            raise MistralError(
                "transformers' ministral3 has one original_max_position_embeddings for YaRN and "
                "the query scaling; these args have two"
            )
        return "ministral3"
    return "ministral" if mixed else "mistral"


def rope_parameters(args: ModelArgs) -> dict[str, Any]:
    """transformers' rope_parameters for a ministral3 config."""
    y, s = args.yarn, args.llama_4_scaling
    rope: dict[str, Any] = {"rope_type": "yarn" if y else "default", "rope_theta": args.rope_theta}
    if y:
        rope |= {
            "factor": y.factor,
            "original_max_position_embeddings": y.original_max_position_embeddings,
            "beta_fast": y.beta,
            "beta_slow": y.alpha,
        }
        if not y.apply_scale:  # equal mscales: an attention factor of 1
            rope |= {"mscale": 1.0, "mscale_all_dim": 1.0}
    if s:
        rope["original_max_position_embeddings"] = s.original_max_position_embeddings
    rope["llama_4_scaling_beta"] = s.beta if s else 0.0  # ministral3 always scales: 0 keeps 1
    rope.setdefault("original_max_position_embeddings", args.max_position_embeddings or 32768)
    return rope


def context(args: ModelArgs) -> int:
    """max_position_embeddings when the args do not say: YaRN's extended context, or 32768."""
    y = args.yarn
    return int(y.factor * y.original_max_position_embeddings) if y else 32768


def config_from_args(args: ModelArgs, dtype: str) -> dict[str, Any]:
    """The config.json transformers expects for these args."""
    moe = args.moe
    kind = model_type(args)
    windows = args.layer_windows()
    config: dict[str, Any] = {
        "architectures": [CLASSES[kind]],
        "model_type": kind,
        "hidden_size": args.dim,
        "num_hidden_layers": args.n_layers,
        "head_dim": args.head_dim,
        "intermediate_size": args.hidden_dim,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "rms_norm_eps": args.norm_eps,
        "vocab_size": args.vocab_size,
        "rope_theta": args.rope_theta,
        "sliding_window": next((w for w in windows if w is not None), None),
        "hidden_act": "silu",
        "tie_word_embeddings": args.tied_embeddings,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "max_position_embeddings": args.max_position_embeddings or context(args),
        "torch_dtype": dtype,
    }
    if kind == "ministral":
        config["layer_types"] = [
            "full_attention" if w is None else "sliding_attention" for w in windows
        ]
    elif kind == "ministral3":
        del config["rope_theta"]
        config["rope_parameters"] = rope_parameters(args)
    if moe:
        config["num_local_experts"] = moe.num_experts
        config["num_experts_per_tok"] = moe.num_experts_per_tok
    return config


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
) -> dict[str, RawTensor | QuantizedTensor]:
    """Renames HF tensors to checkpoint keys and un-permutes wq/wk (lazily); of a mistral3
    folder (``multimodal``), the text decoder's; of an mlx-lm quantized folder (its config's
    ``quantization``), each packed weight with its scales and biases as one QuantizedTensor."""
    if quantization is not None:
        default, layers = quant.config_quantization(quantization, source)
        tensors = quant.gather(dict(tensors), default, layers, source)
    elif any(k.endswith((".scales", ".biases")) for k in tensors):
        first = next(k for k in tensors if k.endswith((".scales", ".biases")))
        raise MistralError(f"{source}: {first} but the config has no quantization block")
    if multimodal:
        tensors = decoder_tensors(tensors)
    out = {}
    unknown = []
    rows = {"wq": args.n_heads, "wk": args.n_kv_heads}
    for name, t in unstack_experts(tensors).items():
        key = from_hf_name(name)
        if key is None:
            unknown.append(name)
            continue
        if key.endswith(("attention.wq.weight", "attention.wk.weight")):
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
