"""Model architecture: exactly the keys of Mistral's params.json, validated in one place."""

from __future__ import annotations

import math
import warnings
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from simple_parsing.helpers import Serializable

from mistral.errors import MistralError
from mistral.files import read_json

# The original reference (mistral-src, and Hugging Face's conversion script) used 1e4 when
# params.json has no rope_theta, as Mistral 7B v0.1's params.json relies on.
DEFAULT_ROPE_THETA = 10_000.0


@dataclass
class MoeArgs(Serializable):
    """Experts chosen per token (params.json ``moe``). Mixtral sets the first two keys; the
    DeepSeekMoE line (Mistral Small 4, DeepSeek-V2/V3) adds shared experts run for every token,
    dense first layers, a scale on the routed sum and group-limited routing (the experts cut into
    ``num_expert_groups`` groups, a token choosing among the best ``num_expert_groups_per_tok``).
    The last three keys are not in Mistral's files; they say how DeepSeek's routers differ."""

    num_experts: int
    num_experts_per_tok: int
    num_shared_experts: int = 0
    expert_hidden_dim: int | None = None  # None: hidden_dim
    first_k_dense_replace: int = 0  # the first layers keep one dense feed-forward
    routed_scale: float = 1.0
    num_expert_groups: int = 1
    num_expert_groups_per_tok: int = 1
    scoring_func: str = "softmax"  # "sigmoid": DeepSeek-V3, with a bias that picks the experts
    norm_topk_prob: bool = True  # the chosen weights sum to 1 (False: DeepSeek-V2)
    group_scoring: str = "top2"  # a group's score: its best two experts' sum, or "max"


def mixtral_like(m: MoeArgs) -> bool:
    """Whether the experts route as Mixtral's do: no shared experts, groups or dense layers,
    softmax scores renormalized, unscaled, every expert of hidden_dim."""
    return (
        (m.num_shared_experts, m.expert_hidden_dim, m.first_k_dense_replace) == (0, None, 0)
        and (m.routed_scale == 1 and m.num_expert_groups == 1 and m.scoring_func == "softmax")
        and m.norm_topk_prob
    )


@dataclass
class YarnArgs(Serializable):
    """YaRN RoPE (params.json ``yarn``): frequencies interpolated by ``factor`` below the ramp
    between ``beta`` (fast) and ``alpha`` (slow) rotations over the original context; with
    ``apply_scale`` (the default, as vLLM reads Mistral's files) q and k are also scaled by
    0.1 * ln(factor) + 1."""

    factor: float
    original_max_position_embeddings: int
    beta: float = 32.0
    alpha: float = 1.0
    apply_scale: bool = True
    # Latent attention only (DeepSeek's name): the softmax scale is multiplied by
    # (0.1 * mscale_all_dim * ln(factor) + 1) ** 2.
    mscale_all_dim: float | None = None


@dataclass
class Llama4ScalingArgs(Serializable):
    """Position-dependent query scaling (params.json ``llama_4_scaling``, Ministral 3): a query
    at position p is multiplied by 1 + beta * ln(1 + floor(p / original_max_position_embeddings)).
    """

    original_max_position_embeddings: int
    beta: float


@dataclass
class ModelArgs(Serializable):
    dim: int
    n_layers: int
    head_dim: int
    hidden_dim: int
    n_heads: int
    n_kv_heads: int
    norm_eps: float
    vocab_size: int
    rope_theta: float = DEFAULT_ROPE_THETA
    # One window for every layer, or a pattern repeated over the layers (None: full attention),
    # as mistral-inference reads a list.
    sliding_window: int | list[int | None] | None = None
    moe: MoeArgs | None = None
    yarn: YarnArgs | None = None
    llama_4_scaling: Llama4ScalingArgs | None = None
    tied_embeddings: bool = False  # the output projection is the embedding table (no output.weight)
    max_position_embeddings: int | None = None  # the context the model was made for (informative)
    # Multi-head latent attention (DeepSeek-V2, Mistral Small 4): keys and values are expanded
    # per head from one latent of kv_lora_rank numbers per token (what the cache holds, with a
    # shared RoPE key of qk_rope_head_dim); queries from a latent of q_lora_rank (None: directly).
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = parse_moe(self.moe)
        for name, cls in (("yarn", YarnArgs), ("llama_4_scaling", Llama4ScalingArgs)):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, parse_block(name, cls, getattr(self, name)))
        validate(self)

    @property
    def n_rep(self) -> int:
        """Query heads per key/value head (GQA)."""
        return self.n_heads // self.n_kv_heads

    @property
    def mla(self) -> bool:
        """Latent attention (the kv_lora_rank family of keys) instead of wq/wk/wv."""
        return self.kv_lora_rank is not None

    @property
    def rope_dim(self) -> int:
        """The dimensions each head rotates: all of head_dim, or latent attention's RoPE part."""
        return self.qk_rope_head_dim if self.mla else self.head_dim  # type: ignore[return-value]

    def moe_layer(self, layer: int) -> bool:
        """Whether ``layer``'s feed-forward is experts (past the dense first layers)."""
        return self.moe is not None and layer >= self.moe.first_k_dense_replace

    def layer_windows(self) -> list[int | None]:
        """The attention window of each layer (None: full attention)."""
        w = self.sliding_window
        if isinstance(w, list):
            return w * (self.n_layers // len(w))
        return [w] * self.n_layers

    @classmethod
    def from_params(cls, params: dict[str, Any], source: str = "params.json") -> ModelArgs:
        """Builds args from a params.json dict; missing or unknown keys are errors, not defaults."""
        return from_params(params, source)

    @classmethod
    def from_file(cls, path: str | Path) -> ModelArgs:
        path = Path(path)
        return from_params(read_json(path), str(path))

    def to_params(self) -> dict[str, Any]:
        """The params.json dict (optional keys left out when unset)."""
        d = self.to_dict()
        if not self.tied_embeddings:
            del d["tied_embeddings"]
        for name, cls in (("moe", MoeArgs), ("yarn", YarnArgs)):  # defaults left out
            if d.get(name) is not None:
                d[name] = non_default(cls, d[name])
        if self.mla and self.yarn is not None:  # latent_defaults reads an absent one otherwise
            d["yarn"]["apply_scale"] = self.yarn.apply_scale
        return {k: v for k, v in d.items() if v is not None}


def non_default(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    """A nested block's keys that are required or differ from their defaults."""
    return {
        f.name: d[f.name] for f in fields(cls) if f.default is MISSING or d[f.name] != f.default
    }


_REQUIRED = (
    "dim",
    "n_layers",
    "head_dim",
    "hidden_dim",
    "n_heads",
    "n_kv_heads",
    "norm_eps",
    "vocab_size",
)


def parse_block(name: str, cls: type, d: Any) -> Any:
    """A nested params.json object (moe, yarn, llama_4_scaling): its keys exactly, no more."""
    if not isinstance(d, dict):
        raise MistralError(f"{name}: expected an object, got {d!r}")
    known = {f.name for f in fields(cls)}
    required = {f.name for f in fields(cls) if f.default is MISSING}
    unknown = sorted(set(d) - known)
    missing = sorted(required - set(d))
    if unknown or missing:
        raise MistralError(
            f"{name}: missing {missing or 'nothing'}, unknown {unknown or 'nothing'}"
        )
    return cls(**d)


def parse_moe(d: Any) -> MoeArgs:
    return parse_block("moe", MoeArgs, d)


# Keys of a vision-language folder's params.json (Mistral Small 3.x, Pixtral): the text decoder is
# what this project runs.
VISION_KEYS = ("vision_encoder", "multimodal")


def text_only(params: dict[str, Any], source: str) -> dict[str, Any]:
    """params without its vision tower, saying so in one line."""
    if not any(k in params for k in VISION_KEYS):
        return params
    warnings.warn(
        f"{source} describes a vision encoder: its text decoder is loaded, images are not "
        "supported yet",
        stacklevel=4,
    )
    return {k: v for k, v in params.items() if k not in VISION_KEYS}


def from_params(params: dict[str, Any], source: str = "params.json") -> ModelArgs:
    if not isinstance(params, dict):
        raise MistralError(f"{source}: expected an object of parameters")
    params = text_only(params, source)
    known = {f.name for f in fields(ModelArgs)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise MistralError(f"{source}: unknown field(s) {', '.join(unknown)}")
    params = latent_defaults(dict(params))
    missing = [k for k in _REQUIRED if k not in params]
    if missing:
        raise MistralError(f"{source}: missing field(s) {', '.join(missing)}")
    if params.get("rope_theta") is None:
        warnings.warn(
            f"{source} has no rope_theta: using {DEFAULT_ROPE_THETA:g}, as the original reference "
            "did (right for Mistral 7B v0.1; v0.2, v0.3 and Mixtral state 1e6)",
            stacklevel=3,
        )
        params["rope_theta"] = DEFAULT_ROPE_THETA
    try:
        if params.get("moe") is not None:
            params["moe"] = parse_moe(params["moe"])
        return ModelArgs(**params)
    except MistralError as e:
        raise MistralError(f"{source}: {e}") from None


def latent_defaults(params: dict[str, Any]) -> dict[str, Any]:
    """A latent-attention params.json as transformers' conversion of Mistral Small 4 reads it:
    head_dim, when absent, is the query/key head (qk_nope_head_dim + qk_rope_head_dim), and YaRN
    without mscale_all_dim scales the softmax by mscale(factor, 1)^2 instead of q and k."""
    if params.get("kv_lora_rank") is None:
        return params
    nope, rope = params.get("qk_nope_head_dim"), params.get("qk_rope_head_dim")
    if "head_dim" not in params and positive_int(nope) and positive_int(rope):
        params["head_dim"] = nope + rope
    yarn = params.get("yarn")
    if isinstance(yarn, dict) and "mscale_all_dim" not in yarn and "apply_scale" not in yarn:
        params["yarn"] = {**yarn, "mscale_all_dim": 1.0, "apply_scale": False}
    return params


def positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def positive_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and 0 < v < math.inf


def validate(a: ModelArgs) -> None:
    """Every consistency rule on the architecture, in one place."""
    ints = ("dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "vocab_size")
    for name in ints:
        v = getattr(a, name)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise MistralError(f"{name} must be a positive integer, got {v!r}")
    for name in ("norm_eps", "rope_theta"):
        v = getattr(a, name)
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < math.inf:
            raise MistralError(f"{name} must be a positive number (and finite), got {v!r}")
    if a.n_heads % a.n_kv_heads:
        raise MistralError(f"n_heads ({a.n_heads}) is not divisible by n_kv_heads ({a.n_kv_heads})")
    if a.head_dim % 2 and a.kv_lora_rank is None:  # latent attention: its RoPE part's
        raise MistralError(f"head_dim must be even for RoPE, got {a.head_dim}")
    w = a.sliding_window
    windows = w if isinstance(w, list) else [w]
    if not windows or any(x is not None and not positive_int(x) for x in windows):
        raise MistralError(
            f"sliding_window must be a positive integer, a list of them and nulls, or absent; "
            f"got {w!r}"
        )
    if a.n_layers % len(windows):
        raise MistralError(
            f"sliding_window's pattern of {len(windows)} does not divide n_layers ({a.n_layers})"
        )
    if not isinstance(a.tied_embeddings, bool):
        raise MistralError(f"tied_embeddings must be true or false, got {a.tied_embeddings!r}")
    m = a.max_position_embeddings
    if m is not None and not positive_int(m):
        raise MistralError(f"max_position_embeddings must be a positive integer, got {m!r}")
    if a.yarn is not None:
        y = a.yarn
        if not positive_int(y.original_max_position_embeddings):
            raise MistralError("yarn.original_max_position_embeddings must be a positive integer")
        for name in ("factor", "beta", "alpha"):
            if not positive_number(getattr(y, name)):
                raise MistralError(f"yarn.{name} must be a positive finite number")
        if not isinstance(y.apply_scale, bool):
            raise MistralError(f"yarn.apply_scale must be true or false, got {y.apply_scale!r}")
    if a.llama_4_scaling is not None:
        s = a.llama_4_scaling
        if not positive_int(s.original_max_position_embeddings):
            raise MistralError(
                "llama_4_scaling.original_max_position_embeddings must be a positive integer"
            )
        b = s.beta
        if isinstance(b, bool) or not isinstance(b, int | float) or not 0 <= b < math.inf:
            raise MistralError(f"llama_4_scaling.beta must be a finite number >= 0, got {b!r}")
    if a.moe is not None:
        validate_moe(a.moe, a.n_layers)
    validate_latent(a)


def validate_moe(m: MoeArgs, n_layers: int) -> None:
    e, k = m.num_experts, m.num_experts_per_tok
    if not (positive_int(e) and positive_int(k) and k <= e):
        raise MistralError(f"moe needs 0 < num_experts_per_tok <= num_experts, got {k} of {e}")
    for name, v, most in (
        ("num_shared_experts", m.num_shared_experts, e),
        ("first_k_dense_replace", m.first_k_dense_replace, n_layers),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= most:
            raise MistralError(f"moe.{name} must be a count from 0 to {most}, got {v!r}")
    if m.expert_hidden_dim is not None and not positive_int(m.expert_hidden_dim):
        raise MistralError(
            f"moe.expert_hidden_dim must be a positive integer, got {m.expert_hidden_dim!r}"
        )
    if not positive_number(m.routed_scale):
        raise MistralError(
            f"moe.routed_scale must be a positive finite number, got {m.routed_scale!r}"
        )
    g, gk = m.num_expert_groups, m.num_expert_groups_per_tok
    if not (positive_int(g) and positive_int(gk) and gk <= g and e % g == 0):
        raise MistralError(
            f"moe needs num_expert_groups dividing num_experts ({e}) and 0 < "
            f"num_expert_groups_per_tok <= num_expert_groups, got {gk} of {g}"
        )
    if k > gk * (e // g):
        raise MistralError(f"moe: {k} experts per token cannot come from {gk} groups of {e // g}")
    if m.scoring_func not in ("softmax", "sigmoid"):
        raise MistralError(f"moe.scoring_func must be softmax or sigmoid, got {m.scoring_func!r}")
    if m.group_scoring not in ("top2", "max"):
        raise MistralError(f"moe.group_scoring must be top2 or max, got {m.group_scoring!r}")
    if m.group_scoring == "top2" and g > 1 and e // g < 2:
        raise MistralError("moe: groups scored by their best two experts need two per group")
    if not isinstance(m.norm_topk_prob, bool):
        raise MistralError(f"moe.norm_topk_prob must be true or false, got {m.norm_topk_prob!r}")


LATENT_KEYS = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


def validate_latent(a: ModelArgs) -> None:
    given = [k for k in LATENT_KEYS if getattr(a, k) is not None]
    if not given and a.q_lora_rank is None:
        if a.yarn is not None and a.yarn.mscale_all_dim is not None:
            raise MistralError("yarn.mscale_all_dim applies to latent attention only")
        return
    if len(given) != len(LATENT_KEYS):
        missing = [k for k in LATENT_KEYS if k not in given]
        raise MistralError(f"latent attention needs {', '.join(missing)} too")
    for k in (*LATENT_KEYS, "q_lora_rank"):
        v = getattr(a, k)
        if v is not None and not positive_int(v):
            raise MistralError(f"{k} must be a positive integer, got {v!r}")
    if a.qk_rope_head_dim % 2:  # type: ignore[operator]
        raise MistralError(f"qk_rope_head_dim must be even for RoPE, got {a.qk_rope_head_dim}")
    qk = a.qk_nope_head_dim + a.qk_rope_head_dim  # type: ignore[operator]
    if a.head_dim != qk:
        raise MistralError(
            f"head_dim ({a.head_dim}) of latent attention must be qk_nope_head_dim + "
            f"qk_rope_head_dim ({qk})"
        )
    all_dim = a.yarn.mscale_all_dim if a.yarn is not None else None
    if all_dim is not None and (isinstance(all_dim, bool) or not positive_number(all_dim)):
        raise MistralError(f"yarn.mscale_all_dim must be a positive finite number, got {all_dim!r}")
