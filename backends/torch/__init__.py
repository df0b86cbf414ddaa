"""The spec in PyTorch (CUDA, MPS, CPU): the three calls of mistral.contract.Backend."""

from __future__ import annotations

from collections.abc import Mapping

from backends.torch.measure import Meter
from backends.torch.references import HFReference
from backends.torch.runner import build
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
) -> HFReference:
    """transformers' Mistral/Mixtral (the reference "hf") holding the same weights."""
    return HFReference(args, tensors, device, dtype)
