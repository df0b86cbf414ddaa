"""Named taps: the points of the forward that both backends report when asked, defined once.

Per layer, in forward order: the attention input norm, q and k after RoPE (T, heads, head_dim) in
Mistral's pair order (latent attention: their RoPE parts, k of one shared head), the attention
output (after wo), the feed-forward input norm, for MoE the router logits and the chosen experts
(sorted), the feed-forward output, and the residual stream after the block. Around them: the
embeddings, the final norm and the logits. One row: (T, ...).
"""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np

from mistral.args import ModelArgs

LAYER_TAPS = (
    "attention_norm",
    "q",
    "k",
    "attention",
    "ffn_norm",
    "router_logits",
    "experts",
    "feed_forward",
    "residual",
)
MOE_ONLY = ("router_logits", "experts")

X = TypeVar("X")


class Recorder:
    """The taps of one layer (or of the model around the layers), bound at construction.

    Off (``store`` None) it only returns what it is given; a trace switches every recorder of a
    model on with the same dict, and each records under its own prefix ("layers.3.")."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.store: dict[str, Any] | None = None

    def __call__(self, name: str, x: X) -> X:
        if self.store is not None:
            self.store[self.prefix + name] = x
        return x


def tap_names(args: ModelArgs) -> list[str]:
    """Every tap of a model, in the order the forward produces them."""
    names = ["embeddings"]
    for i in range(args.n_layers):
        names += [f"layers.{i}.{t}" for t in LAYER_TAPS if args.moe_layer(i) or t not in MOE_ONLY]
    return [*names, "norm", "logits"]


def as_row(name: str, a: np.ndarray, length: int) -> np.ndarray:
    """A backend's raw tap of one row as the tap's (T, ...) layout: q/k come as (1, H, T, D), MoE
    taps as (T, E|k) over the flattened row, the rest as (1, T, ...); chosen experts get sorted."""
    if kind(name) in ("q", "k"):
        return a[0].swapaxes(0, 1)  # (H, T, D) -> (T, H, D)
    if kind(name) == "experts":
        return np.sort(a.reshape(length, -1), axis=-1)
    if kind(name) == "router_logits":
        return a.reshape(length, -1)
    return a[0]


def chosen_experts(router_logits: np.ndarray, k: int) -> np.ndarray:
    """(T, E) router logits -> (T, k) indices of the top-k experts, sorted (the "experts" tap)."""
    return np.sort(np.argsort(-router_logits, axis=-1)[:, :k], axis=-1)


def kind(name: str) -> str:
    """'layers.3.q' -> 'q'; 'logits' -> 'logits'."""
    return name.rsplit(".", 1)[-1] if name.startswith("layers.") else name


def layer(name: str) -> int | None:
    return int(name.split(".")[1]) if name.startswith("layers.") else None
