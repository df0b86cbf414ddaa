"""What a backend provides to mistral/, and how one is imported when chosen."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from mistral.args import ModelArgs
from mistral.cache import StepPlan
from mistral.errors import MistralError
from mistral.measure import cpu_cache_bytes, cpu_copy_bandwidth, cpu_cores  # noqa: F401
from mistral.weights import RawTensor, check_tensors

BACKENDS = {"torch": "torch", "mlx": "mlx"}  # backend name -> the package it needs


class MemoryProbe(Protocol):
    """A device's memory counters: peak since reset and bytes held now; on_device is False where
    the process's resident memory stands in (CPUs, MPS)."""

    on_device: bool

    def reset(self) -> None: ...

    def peak(self) -> int: ...

    def current(self) -> int: ...


class Runner(Protocol):
    """A model on one device and dtype that runs one planned step at a time."""

    backend: str
    device: str
    dtype: str
    args: ModelArgs
    products: str  # what the projections multiply with on this device (a name for reports)

    def new_cache(self, batch: int, size: int) -> Any: ...

    def forward(
        self, tokens: np.ndarray, plan: StepPlan, cache: Any, last_only: bool
    ) -> np.ndarray: ...

    def trace(self, tokens: list[int]) -> dict[str, np.ndarray]: ...

    def memory_probe(self) -> MemoryProbe: ...

    def copy_bandwidth(self) -> float: ...

    def matmul_throughput(self) -> float: ...


def runtime(backend: str) -> Any:
    """The backend's runtime module (``build``; torch's has ``read_pth``); imports its framework."""
    if backend not in BACKENDS:
        raise MistralError(f"unknown backend {backend!r}: use {' or '.join(BACKENDS)}")
    try:
        importlib.import_module(BACKENDS[backend])
    except ImportError:
        extra = f"pip install '.[{backend}]'"
        raise MistralError(f"backend {backend!r} needs {BACKENDS[backend]}: {extra}") from None
    return importlib.import_module(f"backends.{backend}.runtime")


def build(
    backend: str,
    args: ModelArgs,
    tensors: Mapping[str, RawTensor],
    device: str | None,
    dtype: str | None,
    source: str,
    compile: bool = False,
) -> Runner:
    """Checks the tensors against the spec, then hands them to the backend."""
    check_tensors(args, {k: t.shape for k, t in tensors.items()}, source)
    return runtime(backend).build(args, tensors, device, dtype, compile)
