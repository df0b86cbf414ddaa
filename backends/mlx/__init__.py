"""The spec in MLX (Metal; CPU and CUDA on Linux): the three calls of mistral.contract.Backend."""

from __future__ import annotations

from collections.abc import Mapping

from backends.mlx.measure import Meter
from backends.mlx.references import MlxLmReference
from backends.mlx.runner import build
from mistral.args import ModelArgs
from mistral.weights import RawTensor

__all__ = ["build", "meter", "reference"]


def meter(args: ModelArgs, device: str | None, dtype: str | None) -> Meter:
    return Meter(args, device, dtype)


def reference(
    name: str,
    args: ModelArgs,
    tensors: Mapping[str, RawTensor],
    device: str | None,
    dtype: str | None,
) -> MlxLmReference:
    """mlx-lm's Mistral (llama) or Mixtral (the reference "mlx-lm") holding the same weights."""
    return MlxLmReference(args, tensors, device, dtype)
