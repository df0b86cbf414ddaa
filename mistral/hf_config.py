"""Hugging Face's config.json: the model types read (mistral, mixtral, ministral, ministral3,
and mistral3's text decoder) and the one written for a set of args, with YaRN, the query scaling,
per-layer windows and tying as transformers spells them."""

from __future__ import annotations

import math
import warnings
from typing import Any

from mistral import hf_latent
from mistral.args import (
    DEFAULT_ROPE_THETA,
    Llama4ScalingArgs,
    ModelArgs,
    MoeArgs,
    YarnArgs,
    mixtral_like,
)
from mistral.errors import MistralError
from mistral.rope import yarn_mscale

# transformers' model types this reader knows: the text models, and mistral3 (a Pixtral vision
# tower in front of one of them, whose text decoder is read).
TEXT_TYPES = ("mistral", "mixtral", "ministral", "ministral3")
CLASSES = {
    "mistral": "MistralForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "ministral": "MinistralForCausalLM",
    "ministral3": "Ministral3ForCausalLM",
    **hf_latent.CLASSES,
}


def args_from_config(config: dict[str, Any], source: str = "config.json") -> ModelArgs:
    """Maps a config.json of transformers' mistral, mixtral, ministral, ministral3 or mistral3
    (its text decoder) to ModelArgs, refusing what the spec lacks."""
    try:
        return _args_from_config(text_config(config, source), source)
    except KeyError as e:
        raise MistralError(f"{source}: missing key {e.args[0]}") from None
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
    rope: dict[str, Any], source: str, latent: bool = False
) -> tuple[YarnArgs | None, Llama4ScalingArgs | None]:
    """transformers' rope_parameters: YaRN (its attention factor as Mistral's apply_scale) and
    Ministral 3's llama_4_scaling_beta. For ``latent`` attention, YaRN's mscale_all_dim too (the
    softmax scale's factor) and a partial_rotary_factor (the RoPE part, checked by the caller)."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "yarn"):
        raise MistralError(f"{source}: rope scaling {kind!r} is not supported (default or yarn)")
    yarn = None
    if kind == "yarn":
        partial = not latent and rope.get("partial_rotary_factor", 1) != 1
        if rope.get("truncate", True) is not True or partial:
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
            mscale_all_dim=float(rope["mscale_all_dim"])
            if latent and rope.get("mscale_all_dim")
            else None,
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
    if kind not in TEXT_TYPES + hf_latent.TYPES:
        known = ", ".join(TEXT_TYPES + hf_latent.TYPES)
        raise MistralError(f"{source}: model_type {kind!r} is not one of {known}")
    if config.get("hidden_act", "silu") != "silu":
        raise MistralError(f"{source}: hidden_act {config['hidden_act']!r} is not silu")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise TypeError(f"rope_parameters must be an object, got {rope!r}")  # malformed
    yarn, scaling = rope_args(rope, source, latent=kind in hf_latent.TYPES)
    theta = rope.get("rope_theta", config.get("rope_theta", DEFAULT_ROPE_THETA))
    try:
        n_heads = config["num_attention_heads"]
        common: dict[str, Any] = {  # what every type names alike
            "dim": config["hidden_size"],
            "n_layers": config["num_hidden_layers"],
            "hidden_dim": config["intermediate_size"],
            "n_heads": n_heads,
            "n_kv_heads": config.get("num_key_value_heads") or n_heads,
            "norm_eps": config["rms_norm_eps"],
            "vocab_size": config["vocab_size"],
            "rope_theta": float(theta),
            "yarn": yarn,
            "llama_4_scaling": scaling,
            "tied_embeddings": bool(config.get("tie_word_embeddings", False)),
        }
        if kind in hf_latent.TYPES:
            return hf_latent.args_from_config(config, common)
        head_dim = config.get("head_dim") or config["hidden_size"] // n_heads  # HF's own rule
        moe = None
        if kind == "mixtral":
            moe = MoeArgs(config["num_local_experts"], config["num_experts_per_tok"])
        return ModelArgs(
            **common, head_dim=head_dim, sliding_window=windows_of(config, source), moe=moe
        )
    except KeyError as e:
        raise MistralError(f"{source}: missing key {e.args[0]}") from None
    except MistralError as e:
        raise MistralError(f"{source}: {e}") from None


def model_type(args: ModelArgs) -> str:
    """The transformers model type that holds these args: mixtral for MoE; ministral3 for YaRN,
    query scaling or tied embeddings; ministral for windows that differ between layers; for
    latent attention, the type whose router the experts follow (mistral/hf_latent.py)."""
    if args.mla:
        return hf_latent.model_type(args)
    windows = args.layer_windows()
    mixed = len(set(windows)) > 1
    if len({w for w in windows if w is not None}) > 1:
        raise MistralError(
            "transformers has one sliding window per model, these layers have several"
        )
    newer = args.yarn or args.llama_4_scaling or args.tied_embeddings
    if args.moe and not mixtral_like(args.moe):
        raise MistralError(
            "transformers' mixtral routes as Mixtral does: no shared experts, groups, dense "
            "layers, expert_hidden_dim, routed_scale, sigmoid or unnormalized scores"
        )
    if args.moe:
        if mixed or newer:
            raise MistralError("transformers' mixtral has no per-layer windows, YaRN or tying")
        return "mixtral"
    if newer:
        if mixed:
            raise MistralError("transformers' ministral3 has no per-layer windows")
        hf_latent.one_original_context(args, "ministral3")
        return "ministral3"
    return "ministral" if mixed else "mistral"


def rope_parameters(args: ModelArgs) -> dict[str, Any]:
    """transformers' rope_parameters for a ministral3 config."""
    y, s = args.yarn, args.llama_4_scaling
    rope: dict[str, Any] = {"rope_type": "yarn" if y else "default", "rope_theta": args.rope_theta}
    if y:
        rope |= hf_latent.yarn_keys(y)
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
    if args.mla:
        return hf_latent.config_from_args(args, dtype)
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
