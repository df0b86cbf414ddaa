"""The backend contract: what a backend provides to mistral/, typed, and how one is chosen.

A backend is a package ``backends/<name>`` (imported only when chosen) whose ``__init__`` exposes
three functions, ``build``, ``meter`` and ``reference`` (the Backend protocol below). Everything
else about it is its own business: mistral/ reaches a model only through a Runner, and users and
tools reach it only through mistral.Model.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Protocol, cast, runtime_checkable

import numpy as np

from mistral.args import ModelArgs
from mistral.cache import StepPlan, Window
from mistral.errors import MistralError
from mistral.fp8 import FP8Tensor
from mistral.measure import Meter, Timing
from mistral.parallel import KINDS
from mistral.weights import RawTensor, check_tensors

BACKENDS = ("torch", "mlx")  # each is also the name of the framework it imports
REFERENCES = {"hf": "torch", "mlx-lm": "mlx"}  # outside references, by the backend that runs them
# What becomes of FP8 weights (mistral/fp8.py): kept as e4m3 bytes and dequantized where each
# projection runs; dequantized once, at load, to the run's dtype; or kept and multiplied in FP8,
# the activations quantized too
FP8_MODES = ("keep", "dequantize", "scaled")


class Cache(Protocol):
    """One batch's buffers of every layer (keys and values today), made by ``Runner.new_cache``
    and handed back to ``Runner.forward``; mistral/ never looks inside."""


@runtime_checkable
class Runner(Protocol):
    """A model on one device and dtype that runs one planned step at a time."""

    args: ModelArgs
    device: str  # as the framework names it: "cuda:0", "cpu", "gpu"
    dtype: str  # "float32", "bfloat16", "float16"

    def new_cache(self, batch: int, sizes: Mapping[Window, int]) -> Cache:
        """Empty buffers for ``batch`` rows at every layer, ``sizes[w]`` slots per row for a
        layer whose attention window is w (mistral.cache.Planner.sizes)."""
        ...

    def forward(
        self,
        tokens: np.ndarray,
        plans: Mapping[Window, StepPlan],
        cache: Cache | None,
        last_only: bool,
    ) -> np.ndarray:
        """(B, T) token ids -> float32 logits (B, T, V), or (B, V) at each row's last new token;
        a layer follows the plan of its window. Without a cache, attention reads the new tokens
        alone (every plan's ``key_layout`` is "new")."""
        ...

    def share(self, data: bytes) -> bytes:
        """Rank 0's bytes on every rank of a model split over parallel ranks (a line typed there,
        a seed drawn there); one process: the bytes themselves. Every rank calls it in step."""
        ...

    def trace(self, tokens: list[int]) -> dict[str, np.ndarray]:
        """Every named tap (mistral.taps) of one uncached forward of one row, float32 (T, ...)."""
        ...

    def recording(self) -> AbstractContextManager[dict[str, np.ndarray]]:
        """A block whose forwards record every named tap of row 0 into the dict it gives,
        float32 (T, ...), filled as the block ends (a cached step's taps, as diff needs)."""
        ...


class Reference(Protocol):
    """An outside implementation holding the same weights (transformers, mlx-lm), for diff and
    bench: the same taps as a Runner's trace, its own greedy generation, and a timed run."""

    device: str
    dtype: str

    def trace(self, tokens: list[int]) -> dict[str, np.ndarray]: ...

    def greedy(self, prompt: list[int], n: int) -> list[int]: ...

    def timed(self, prompts: list[list[int]], gen_len: int) -> Callable[[], Timing]: ...


class Backend(Protocol):
    """What ``backends/<name>/__init__.py`` exposes."""

    def build(
        self,
        args: ModelArgs,
        tensors: Mapping[str, RawTensor],
        device: str | None,
        dtype: str | None,
        compile: bool,
        parallel: str | None,
        fp8: str,
    ) -> Runner:
        """The model on a device ("cuda:1", "cpu"; None = the best) and dtype (None = the
        device's best); tensors are named by checkpoint keys and already checked. ``parallel``
        "tensor": this process's share of a model split over the launcher's ranks
        (mistral/parallel.py), every rank giving the same logits. ``fp8`` (FP8_MODES): what
        becomes of FP8 weights, "keep", "dequantize" or "scaled" (mistral/fp8.py)."""
        ...

    def meter(self, args: ModelArgs, device: str | None, dtype: str | None) -> Meter:
        """Measurements on the device and dtype that ``build`` would choose for these args."""
        ...

    def reference(
        self,
        name: str,
        args: ModelArgs,
        tensors: Mapping[str, RawTensor],
        device: str | None,
        dtype: str | None,
    ) -> Reference:
        """The outside reference ``name`` (REFERENCES) that runs on this backend's framework."""
        ...


def backend(name: str) -> Backend:
    """The chosen backend, importing its framework; a one-line error when it is missing."""
    if name not in BACKENDS:
        raise MistralError(f"unknown backend {name!r}: use {' or '.join(BACKENDS)}")
    try:
        importlib.import_module(name)
    except ImportError:
        raise MistralError(f"backend {name!r} needs {name}: pip install '.[{name}]'") from None
    return cast(Backend, importlib.import_module(f"backends.{name}"))


def build(
    name: str,
    args: ModelArgs,
    tensors: Mapping[str, RawTensor],
    device: str | None,
    dtype: str | None,
    source: str,
    compile: bool = False,
    parallel: str | None = None,
    fp8: str = "keep",
) -> Runner:
    """Checks the tensors against the spec, then hands them to the backend."""
    check_tensors(args, {k: t.shape for k, t in tensors.items()}, source)
    if parallel is not None and parallel not in KINDS:
        raise MistralError(f"unknown parallel {parallel!r}: use {' or '.join(KINDS)}")
    if fp8 not in FP8_MODES:
        raise MistralError(f"unknown fp8 {fp8!r}: use {', '.join(FP8_MODES)}")
    if fp8 != "keep" and not any(isinstance(t, FP8Tensor) for t in tensors.values()):
        raise MistralError(f"{source}: fp8 {fp8} is for FP8 weights, and it has none")
    return backend(name).build(args, tensors, device, dtype, compile, parallel, fp8)


def reference(
    name: str,
    args: ModelArgs,
    tensors: Mapping[str, RawTensor],
    device: str | None,
    dtype: str | None,
) -> Reference:
    """An outside reference (``hf``, ``mlx-lm``) holding these weights."""
    if name not in REFERENCES:
        raise MistralError(f"unknown reference {name!r}: use {', '.join(REFERENCES)}")
    return backend(REFERENCES[name]).reference(name, args, tensors, device, dtype)
