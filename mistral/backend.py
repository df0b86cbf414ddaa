"""What a backend provides to mistral/, and how one is imported when chosen."""

from __future__ import annotations

import importlib
import os
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mistral.args import ModelArgs
from mistral.cache import StepPlan
from mistral.errors import MistralError
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


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_copy_bandwidth(nbytes: int = 256 * 2**20) -> float:
    """Bytes/s of a large copy (it reads and writes every byte) split over one thread per core,
    best of 5: the machine's figure, the same whichever framework is measured against it."""
    src = np.ones(nbytes // 8)
    dst = np.empty_like(src)
    bounds = np.linspace(0, len(src), cpu_cores() + 1).astype(int)

    def part(i: int) -> None:  # numpy lets go of the GIL while it copies
        np.copyto(dst[bounds[i] : bounds[i + 1]], src[bounds[i] : bounds[i + 1]])

    best = float("inf")
    with ThreadPoolExecutor(len(bounds) - 1) as pool:
        for _ in range(6):
            start = time.perf_counter()
            list(pool.map(part, range(len(bounds) - 1)))
            best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


def cpu_cache_bytes() -> int:
    """The CPU's largest (last-level) cache in bytes, from Linux's sysfs; 0 where unknown."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()  # e.g. "32768K"
        scale = units.get(text[-1:], 1)
        digits = text[:-1] if text[-1:] in units else text
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=0)


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
