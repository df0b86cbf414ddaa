"""Measurement without a framework: timings, resident memory, CPU cores, cache and bandwidth."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np


class Meter(Protocol):
    """What a backend measures on one device and dtype, apart from inference (mistral bench).

    Made before the model is built (to read what the process holds already); its products are
    the ones the Linear layers of a model of the same shape use there."""

    device: str
    dtype: str
    on_device: bool  # False where the process's resident memory stands in (CPUs, MPS)
    products: str  # what the projections multiply with here (a name for reports)

    def reset_peak(self) -> None: ...

    def peak(self) -> int: ...

    def held(self) -> int: ...

    def copy_bandwidth(self) -> float: ...

    def matmul_throughput(self) -> float: ...


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def memory_limit() -> int:
    """Bytes this process may still allocate at most: the machine's memory, or what is left of
    an address-space limit (ulimit -v) when that is lower; 0 where unknown."""
    try:
        limit = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        limit = 0
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    except (ImportError, OSError, ValueError):
        return limit
    if soft != resource.RLIM_INFINITY:
        used = ResidentMemory.status("VmSize") or 0
        limit = min(limit or soft, max(soft - used, 0))
    return limit


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


@dataclass
class Timing:
    prefill_s: float
    decode_s: float
    peak_bytes: int


class ResidentMemory:
    """Peak resident memory of this process over a block.

    On Linux the kernel keeps the high-water mark (VmHWM), reset by writing 5 to clear_refs, so
    nothing runs beside the measured code. Elsewhere a thread samples every few milliseconds."""

    def __init__(self, every_s: float = 0.002) -> None:
        self.every_s = every_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def status(field: str) -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    @staticmethod
    def _reset_high_water_mark() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def current() -> int:
        rss = ResidentMemory.status("VmRSS")
        if rss is not None:
            return rss
        import resource  # no /proc (macOS): the lifetime maximum is all there is

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            time.sleep(self.every_s)

    def __enter__(self) -> ResidentMemory:
        self.peak = self.current()
        if not (self._reset_high_water_mark() and self.status("VmHWM") is not None):
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self.peak = max(self.peak, self.status("VmHWM") or 0, self.current())


def held_now(meter: Meter) -> int:
    """What the process holds now: device memory, or on a CPU resident memory once the heap has
    given freed pages back (so one implementation's garbage is not the next one's baseline)."""
    if meter.on_device:
        return meter.held()
    gc.collect()
    with contextlib.suppress(AttributeError, OSError):  # glibc; elsewhere nothing to trim
        ctypes.CDLL(None).malloc_trim(0)
    return ResidentMemory.current()


def timed_run(meter: Meter, prefill: Callable[[], object], decode: Callable[[], object]) -> Timing:
    """Times one generation run, prefill (to the first token) then decode, with the peak memory
    over both: the device's peak, or on a CPU the process's resident peak."""
    with ResidentMemory() as rss:
        meter.reset_peak()
        start = time.perf_counter()
        prefill()
        first = time.perf_counter()
        decode()
        end = time.perf_counter()
    return Timing(first - start, end - first, meter.peak() if meter.on_device else rss.peak)
