"""What the torch backend measures for mistral bench (mistral.measure.Meter): device memory,
copy bandwidth, and the throughput of products as the Linear layers multiply."""

from __future__ import annotations

import time

import torch

from backends.torch.kernels import linear_kernel
from backends.torch.runner import dtype_name, resolve_device, resolve_dtype
from mistral.args import ModelArgs
from mistral.measure import cpu_copy_bandwidth
from mistral.weights import linear_bytes


class Meter:
    """Peak device memory on CUDA; on CPUs (and MPS, which keeps no peak) the caller samples
    resident memory instead."""

    def __init__(self, args: ModelArgs, device: str | None, dtype: str | None) -> None:
        self.torch_device = resolve_device(device)
        self.torch_dtype = resolve_dtype(dtype, self.torch_device)
        self.device = str(self.torch_device)
        self.dtype = dtype_name(self.torch_dtype)
        self.on_device = self.torch_device.type == "cuda"
        weight_bytes = linear_bytes(args, self.torch_dtype.itemsize)
        self.kernel = linear_kernel(self.torch_device, self.torch_dtype, weight_bytes)
        self.products = "F.linear" if self.kernel is None else "oneDNN inner product"

    def synchronize(self) -> None:
        if self.torch_device.type == "cuda":
            torch.cuda.synchronize(self.torch_device)
        elif self.torch_device.type == "mps":
            torch.mps.synchronize()

    def reset_peak(self) -> None:
        if self.on_device:
            self.synchronize()
            torch.cuda.reset_peak_memory_stats(self.torch_device)

    def peak(self) -> int:
        return int(torch.cuda.max_memory_allocated(self.torch_device)) if self.on_device else 0

    def held(self) -> int:
        return int(torch.cuda.memory_allocated(self.torch_device)) if self.on_device else 0

    def copy_bandwidth(self, nbytes: int = 256 * 2**20) -> float:
        """Bytes/s of a large device-to-device copy (it reads and writes every byte), best of 5;
        on a CPU the machine's figure, the same for every framework (cpu_copy_bandwidth)."""
        if self.torch_device.type == "cpu":
            return cpu_copy_bandwidth(nbytes)
        x = torch.ones(nbytes // 4, dtype=torch.float32, device=self.torch_device)
        y = torch.empty_like(x)
        return 2 * nbytes / self.best_time(lambda: y.copy_(x))

    def matmul_throughput(self, n: int | None = None) -> float:
        """FLOP/s of an n x n by n x n product in the dtype, multiplied as the Linear layers
        multiply (the kernel, or F.linear), best of 5; n is 8192 on GPUs and 1024 on CPUs."""
        n = n or (1024 if self.torch_device.type == "cpu" else 8192)
        x = torch.randn(n, n, device=self.torch_device).to(self.torch_dtype)
        w = torch.randn(n, n, device=self.torch_device).to(self.torch_dtype)
        product = self.kernel or torch.nn.functional.linear
        with torch.inference_mode():
            return 2 * n**3 / self.best_time(lambda: product(x, w))

    def best_time(self, work) -> float:
        best = float("inf")
        for _ in range(6):
            self.synchronize()
            start = time.perf_counter()
            work()
            self.synchronize()
            best = min(best, time.perf_counter() - start)
        return best
