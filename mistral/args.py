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
    num_experts: int
    num_experts_per_tok: int


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
        return {k: v for k, v in d.items() if v is not None}


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
    missing = [k for k in _REQUIRED if k not in params]
    if missing:
        raise MistralError(f"{source}: missing field(s) {', '.join(missing)}")
    params = dict(params)
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
    if a.head_dim % 2:
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
        e, k = a.moe.num_experts, a.moe.num_experts_per_tok
        if not (isinstance(e, int) and isinstance(k, int) and 0 < k <= e):
            raise MistralError(f"moe needs 0 < num_experts_per_tok <= num_experts, got {k} of {e}")
