"""Measurement without a framework: CPU cores, cache and copy bandwidth, resident memory."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


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
