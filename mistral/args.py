"""Model architecture: exactly the keys of Mistral's params.json, validated in one place."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields
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
    sliding_window: int | None = None
    moe: MoeArgs | None = None

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = parse_moe(self.moe)
        validate(self)

    @property
    def n_rep(self) -> int:
        """Query heads per key/value head (GQA)."""
        return self.n_heads // self.n_kv_heads

    def layer_windows(self) -> list[int | None]:
        """The attention window of each layer (None: full attention); one for all today."""
        return [self.sliding_window] * self.n_layers

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


def parse_moe(d: Any) -> MoeArgs:
    if not isinstance(d, dict):
        raise MistralError(f"moe: expected an object, got {d!r}")
    known = {f.name for f in fields(MoeArgs)}
    unknown = sorted(set(d) - known)
    missing = sorted(known - set(d))
    if unknown or missing:
        raise MistralError(f"moe: missing {missing or 'nothing'}, unknown {unknown or 'nothing'}")
    return MoeArgs(**d)


def from_params(params: dict[str, Any], source: str = "params.json") -> ModelArgs:
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
    if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w <= 0):
        raise MistralError(f"sliding_window must be a positive integer or absent, got {w!r}")
    if a.moe is not None:
        e, k = a.moe.num_experts, a.moe.num_experts_per_tok
        if not (isinstance(e, int) and isinstance(k, int) and 0 < k <= e):
            raise MistralError(f"moe needs 0 < num_experts_per_tok <= num_experts, got {k} of {e}")
