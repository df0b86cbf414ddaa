"""What the MLX backend measures for mistral bench (mistral.measure.Meter): device memory,
copy bandwidth, and the throughput of products as the Linear layers multiply."""

from __future__ import annotations

import time

import mlx.core as mx

from backends.mlx.kernels import SplitRows, cpu_streams
from backends.mlx.runner import dtype_name, resolve_device, resolve_dtype
from mistral.args import ModelArgs
from mistral.measure import cpu_copy_bandwidth
from mistral.weights import linear_bytes


class Meter:
    """Peak MLX memory on the GPU; on the CPU the caller samples resident memory instead."""

    def __init__(self, args: ModelArgs, device: str | None, dtype: str | None) -> None:
        self.mx_device = resolve_device(device)
        self.mx_dtype = resolve_dtype(dtype, self.mx_device)
        self.device = "gpu" if self.mx_device == mx.gpu else "cpu"
        self.dtype = dtype_name(self.mx_dtype)
        self.on_device = self.mx_device == mx.gpu
        self.streams = cpu_streams(self.mx_device, linear_bytes(args, self.mx_dtype.size))
        self.products = (
            f"split over {len(self.streams)} CPU streams" if self.streams else "nn.Linear"
        )

    def reset_peak(self) -> None:
        if self.on_device:
            mx.reset_peak_memory()

    def peak(self) -> int:
        return int(mx.get_peak_memory()) if self.on_device else 0

    def held(self) -> int:
        return int(mx.get_active_memory()) if self.on_device else 0

    def copy_bandwidth(self, nbytes: int = 256 * 2**20) -> float:
        """Bytes/s of a large elementwise pass (it reads and writes every byte), best of 5; on a
        CPU the machine's figure, the same for every framework (cpu_copy_bandwidth): MLX's own
        CPU pass runs on one thread at a fraction of the memory bandwidth."""
        if self.mx_device == mx.cpu:
            return cpu_copy_bandwidth(nbytes)
        with mx.stream(self.mx_device):
            x = mx.ones((nbytes // 4,), dtype=mx.float32)
            mx.eval(x)
            return 2 * nbytes / self.best_time(lambda: x + 1.0)

    def matmul_throughput(self, n: int | None = None) -> float:
        """FLOP/s of an n x n by n x n product in the dtype, multiplied as the Linear layers
        multiply (split over streams, or x @ w.T), best of 5; n is 8192 on GPUs and 1024 on CPUs."""
        n = n or (1024 if self.mx_device == mx.cpu else 8192)
        with mx.stream(self.mx_device):
            x = mx.random.normal((n, n)).astype(self.mx_dtype)
            w = mx.random.normal((n, n)).astype(self.mx_dtype)
            mx.eval(x, w)
            product = SplitRows(w, self.streams) if self.streams else lambda x, w: x @ w.T
            return 2 * n**3 / self.best_time(lambda: product(x, w))

    def best_time(self, work) -> float:
        best = float("inf")
        for _ in range(6):
            start = time.perf_counter()
            mx.eval(work())
            best = min(best, time.perf_counter() - start)
        return best
