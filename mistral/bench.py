"""Speed and memory of prefill and decode, side by side with Hugging Face transformers and mlx-lm.

Each measured run feeds ``batch`` random prompts of ``prompt_len`` tokens and decodes ``gen_len``
tokens greedily. Prefill time is the time to the first token; decode tokens/s counts the remaining
``gen_len - 1`` steps. Runs repeat after a warm-up and report the median and the spread (min, max);
the implementations take turns within each round, so a machine whose speed drifts affects all alike.
Memory is what an implementation adds to the process, measured in its warm-up run before the next
one is built: the peak of device memory (CUDA, Metal) or of resident memory (CPUs) during the run,
less what the process held before the implementation was built: its weights, cache and activations.
The decode bound is the bytes one step must read (weights, less the embedding table but one row and
the experts not chosen, plus the KV cache in use) over the device's copy bandwidth: on GPUs a copy
on the device, on CPUs a numpy copy split over every core (the median of one per round). Prefill
is set against compute: its floating-point operations (prefill_flops) over the time to the first
token, as a fraction of what a large square product reaches on the device in the run's dtype,
multiplied the way the projections multiply there. A figure whose runs spread more than SPREAD
(max / min) makes the ratios it enters unreliable, and says so. Each decode step is timed too,
for decode speed against the context length (decode_by_context).
"""

from __future__ import annotations

import importlib.metadata
import itertools
import os
import platform
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mistral.api import Model, from_tensors
from mistral.args import ModelArgs
from mistral.contract import REFERENCES, backend, reference
from mistral.fp8 import FP8Tensor
from mistral.measure import Meter, Timing, cpu_cores, held_now, timed_run
from mistral.quant import QuantizedTensor
from mistral.weights import (
    RawTensor,
    attention_shapes,
    cached_numbers,
    ffn_shapes,
    latent_attention_shapes,
)

SPREAD = 2.0  # repeats of a figure spread wider than this (max / min) make its ratio unreliable
PACKAGES = ("numpy", "torch", "mlx", "transformers", "mlx-lm")  # versions in the report


@dataclass
class Result:
    name: str
    device: str
    dtype: str
    prefill_tok_s: list[float] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    decode_tok_s: list[float] = field(default_factory=list)
    peak_bytes: list[int] = field(default_factory=list)
    decode_steps: list[list[float]] = field(default_factory=list)  # seconds per step, per run

    def median(self, key: str) -> float:
        return float(statistics.median(getattr(self, key)))

    def summary(self) -> dict:
        out = {"name": self.name, "device": self.device, "dtype": self.dtype}
        for key in ("prefill_tok_s", "ttft_s", "decode_tok_s", "peak_bytes"):
            values = getattr(self, key)
            out[key] = {
                "median": self.median(key),
                "min": min(values),
                "max": max(values),
                "spread": max(values) / min(values) if min(values) > 0 else float("inf"),
                "runs": values,
            }
        return out


class StepClock:
    """The times at which a run's tokens reach the host: the first token's, then each decode
    step's; ``take`` gives the decode steps' durations and starts over."""

    def __init__(self) -> None:
        self.ticks: list[float] = []

    def tick(self) -> None:
        self.ticks.append(time.perf_counter())

    def take(self) -> list[float]:
        steps = np.diff(self.ticks).tolist()
        self.ticks = []
        return steps


def random_prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(3, vocab, (batch, length)).tolist()


def decode_bytes(
    args: ModelArgs, tensors: dict[str, RawTensor], dtype_bytes: int, context: int, batch: int
) -> int:
    """Bytes one decode step reads: the weights it uses and the KV cache in use."""
    total = 0
    for name, t in tensors.items():
        # A quantized weight is read as it is stored: its codes, scales and biases.
        stored = isinstance(t, QuantizedTensor | FP8Tensor)
        n = t.nbytes if stored else int(np.prod(t.shape)) * dtype_bytes
        if name == "tok_embeddings.weight" and not args.tied_embeddings:
            n = t.shape[1] * dtype_bytes * batch  # one row per token (tied: the output's weight)
        elif ".experts." in name and args.moe:
            n = n * min(1.0, batch * args.moe.num_experts_per_tok / args.moe.num_experts)
        total += int(n)
    keys = sum(min(context, w or context) for w in args.layer_windows())  # over the layers
    return total + cached_numbers(args) * keys * dtype_bytes * batch


def prefill_flops(args: ModelArgs, prompt_len: int, batch: int) -> int:
    """Floating-point operations (2 per multiply-add) one prefill needs: every projection for each
    prompt token (of the experts, the chosen ones), attention over the keys each token sees, and
    the output projection for the last token of each row only, as ours computes."""
    a = args
    attention = latent_attention_shapes(a) if a.mla else attention_shapes(a)
    projections = a.n_layers * sum(int(np.prod(s)) for s in attention.values() if len(s) == 2)
    for layer in range(a.n_layers):
        for name, shape in ffn_shapes(a, layer).items():
            routed = a.moe is not None and name.startswith("experts.")
            chosen = a.moe.num_experts_per_tok / a.moe.num_experts if routed else 1  # type: ignore
            projections += int(np.prod(shape) * chosen) if len(shape) == 2 else 0
    seen = sum(  # keys seen, over the queries and the layers
        sum(min(t, w or prompt_len) for t in range(1, prompt_len + 1)) for w in a.layer_windows()
    )
    qk, v = (a.qk_nope_head_dim + a.qk_rope_head_dim, a.v_head_dim) if a.mla else (a.head_dim,) * 2
    per_row = prompt_len * projections + a.n_heads * (qk + v) * seen  # type: ignore[operator]
    return 2 * batch * (per_row + a.dim * a.vocab_size)


def warm_up(
    name: str,
    run: Callable[[], Timing],
    warmup: int,
    held_before: int,
    progress: Callable[[str], None] | None = None,
) -> list[int]:
    """The warm-up runs of an implementation just built, and the memory each needed beyond what
    the process held before the implementation was built: its weights, cache and activations."""
    added = []
    for i in range(warmup):
        added.append(max(run().peak_bytes - held_before, 0))
        if progress:
            progress(f"{name}: warm-up {i + 1}/{warmup}")
    return added


def measure_rounds(
    runs: list[tuple[str, str, str, Callable[[], Timing]]],
    batch: int,
    prompt_len: int,
    gen_len: int,
    repeats: int,
    bandwidth: Callable[[], float],
    progress: Callable[[str], None] | None = None,
    clocks: list[StepClock] | None = None,
) -> tuple[list[Result], list[float]]:
    """Runs the (warm) implementations in turn, one round per repeat, with a copy bandwidth
    measured each round: a machine that slows down mid-bench slows all of them alike. Each
    run's clock (when given) holds its decode steps' durations afterwards."""
    results = [Result(name, device, dtype) for name, device, dtype, _ in runs]
    bandwidths = []
    for i in range(repeats):
        for j, (result, (_, _, _, run)) in enumerate(zip(results, runs, strict=True)):
            if clocks:
                clocks[j].take()  # from a clean start
            t = run()
            if clocks:
                result.decode_steps.append(clocks[j].take())
            result.ttft_s.append(t.prefill_s)
            result.prefill_tok_s.append(batch * prompt_len / t.prefill_s)
            result.decode_tok_s.append(batch * (gen_len - 1) / max(t.decode_s, 1e-12))
        bandwidths.append(bandwidth())
        if progress:
            progress(f"round {i + 1}/{repeats}")
    return results, bandwidths


def our_run(
    model: Model,
    meter: Meter,
    prompts: list[list[int]],
    gen_len: int,
    chunk_size: int | None,
    on_step: Callable[[], None] = lambda: None,
) -> Callable[[], Timing]:
    """One timed run of the generation loop users call (greedy); ``on_step`` is called as each
    step's tokens reach the host, the first token's too."""

    def run() -> Timing:
        steps = model.stream(prompts, gen_len, chunk_size=chunk_size)

        def decode() -> None:
            for _ in steps:
                on_step()

        return timed_run(meter, lambda: (next(steps), on_step()), decode)

    return run


@dataclass
class BenchSetup:
    args: ModelArgs
    tensors: dict[str, RawTensor]
    source: str
    backend: str
    device: str | None
    dtype: str | None
    prompt_len: int
    gen_len: int
    batch: int
    repeats: int
    warmup: int
    chunk_size: int | None = None
    compare: tuple[str, ...] = ()
    compile: bool = False
    parallel: str | None = None  # under torchrun or mlx.launch: this rank's share
    fp8: str = "keep"  # what becomes of FP8 weights (contract.FP8_MODES)


def run_bench(s: BenchSetup, progress: Callable[[str], None] | None = None) -> dict:
    """Measures our backend, then each reference asked for, on the same weights and prompts."""
    prompts = random_prompts(s.batch, s.prompt_len, s.args.vocab_size)
    # Each implementation is built, then warmed up (and its memory measured) before the next is
    # built, so that what it adds to the process is its own.
    meter = backend(s.backend).meter(s.args, s.device, s.dtype)
    before = held_now(meter)
    built = (s.args, s.tensors, s.backend, s.device, s.dtype, s.source, s.compile)
    model = from_tensors(*built, parallel=s.parallel, fp8=s.fp8)
    fp8 = "" if s.fp8 == "keep" else f", fp8 {s.fp8}"
    name, clocks = f"ours ({s.backend}{fp8})", [StepClock()]
    ours = our_run(model, meter, prompts, s.gen_len, s.chunk_size, clocks[0].tick)
    runs = [(name, model.device, model.dtype, ours)]
    memory = [warm_up(name, ours, s.warmup, before, progress)]
    for ref in s.compare:
        before = held_now(backend(REFERENCES[ref]).meter(s.args, s.device, model.dtype))
        side = reference(ref, s.args, s.tensors, s.device, model.dtype)
        clocks.append(StepClock())  # contract.Reference.timed does not declare on_step yet
        run = side.timed(prompts, s.gen_len, on_step=clocks[-1].tick)  # type: ignore[call-arg]
        runs.append((ref, side.device, side.dtype, run))
        memory.append(warm_up(ref, run, s.warmup, before, progress))
    results, bandwidths = measure_rounds(
        runs, s.batch, s.prompt_len, s.gen_len, s.repeats, meter.copy_bandwidth, progress, clocks
    )
    for result, added in zip(results, memory, strict=True):
        result.peak_bytes = added
    return report(s, meter, results, float(statistics.median(bandwidths)))


def versions() -> dict[str, str | None]:
    """Installed versions of the packages a bench may use, read without importing them."""
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def command_output(*argv: str) -> str:
    """What a system tool prints, stripped; "" when it is missing or fails."""
    if shutil.which(argv[0]) is None:
        return ""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def cpu_model() -> str:
    """The CPU's name: Linux's /proc/cpuinfo, macOS's sysctl, else what platform knows."""
    path = Path("/proc/cpuinfo")
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                return value.strip()
    return command_output("sysctl", "-n", "machdep.cpu.brand_string") or platform.processor()


def machine() -> dict:
    """The machine a bench ran on: platform, CPU, cores, memory, GPUs (NVIDIA's through
    nvidia-smi; on Apple silicon the GPU is the chip's)."""
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        memory = None
    cpu = cpu_model()
    gpus = [
        g
        for g in command_output(
            "nvidia-smi", "--query-gpu=name", "--format=csv,noheader"
        ).splitlines()
        if g.strip()
    ]
    if not gpus and platform.system() == "Darwin" and platform.machine() == "arm64":
        gpus = [f"{cpu} (the chip's GPU)"]
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": cpu_cores(),
        "memory_bytes": memory,
        "gpus": gpus,
    }


def spread_warnings(results: list[Result]) -> tuple[list[str], dict[str, list[str]]]:
    """Warnings for figures whose repeats spread more than SPREAD (max / min), and for each
    reference the ratios (decode, prefill) they make unreliable."""
    warnings, unreliable = [], {r.name: [] for r in results[1:]}
    for r in results:
        for key, kind, label in (
            ("prefill_tok_s", "prefill", "prefill tok/s (and TTFT)"),
            ("decode_tok_s", "decode", "decode tok/s"),
        ):
            runs = getattr(r, key)
            spread = max(runs) / min(runs) if min(runs) > 0 else float("inf")
            if spread <= SPREAD:
                continue
            hit = list(unreliable) if r is results[0] else [r.name]
            for name in hit:
                unreliable[name].append(kind)
            ratios = ", ".join(f"ours / {name} {kind}" for name in hit)
            warnings.append(
                f"{r.name} {label}: its {len(runs)} runs spread x{spread:.1f} (max/min > "
                f"{SPREAD:g})" + (f", so {ratios} is unreliable" if ratios else "")
            )
    return warnings, {name: sorted(set(kinds)) for name, kinds in unreliable.items()}


def decode_by_context(s: BenchSetup, results: list[Result], bins: int = 16) -> dict:
    """Decode tokens/s against the context length, from the measured runs themselves: decode
    step j of a run (j = 1 .. gen_len - 1) has prompt_len + j tokens in its context (it sees
    at most the sliding window of them, where there is one); the steps are binned by that
    length (up to ``bins`` bins of at least 4 steps), and each bin's speed is the median over
    the runs of its steps' tokens over their time."""
    n = s.gen_len - 1
    edges = np.linspace(0, n, max(1, min(bins, n // 4)) + 1).round().astype(int)
    spans = [(int(lo), int(hi)) for lo, hi in itertools.pairwise(edges)]
    tok_s = {}
    for r in results:
        runs = [np.asarray(steps) for steps in r.decode_steps if len(steps) == n]
        per_run = [[s.batch * (hi - lo) / t[lo:hi].sum() for lo, hi in spans] for t in runs]
        tok_s[r.name] = np.median(per_run, axis=0).tolist() if per_run else []
    return {
        "context": [s.prompt_len + (lo + 1 + hi) / 2 for lo, hi in spans],
        "steps": [[s.prompt_len + lo + 1, s.prompt_len + hi] for lo, hi in spans],
        "tok_s": tok_s,
    }


def report(s: BenchSetup, meter: Meter, results: list[Result], bandwidth: float) -> dict:
    """The figures of a bench as a JSON-able dict: results, ratios, and the two bounds."""
    context = s.prompt_len + s.gen_len // 2  # keys read by the average decode step
    dtype_bytes = 4 if meter.dtype == "float32" else 2
    step_bytes = decode_bytes(s.args, s.tensors, dtype_bytes, context, s.batch)
    bound = s.batch * bandwidth / step_bytes
    ours = results[0]
    flops = prefill_flops(s.args, s.prompt_len, s.batch)
    matmul = meter.matmul_throughput()
    warnings, unreliable = spread_warnings(results)
    return {
        "setup": {
            "source": s.source,
            "args": s.args.to_params(),
            "backend": s.backend,
            "device": meter.device,
            "dtype": meter.dtype,
            "products": meter.products,
            "prompt_len": s.prompt_len,
            "gen_len": s.gen_len,
            "batch": s.batch,
            "repeats": s.repeats,
            "warmup": s.warmup,
        },
        "results": [r.summary() for r in results],
        "bandwidth_bytes_s": bandwidth,
        "decode_bytes_per_step": step_bytes,
        "decode_bound_tok_s": bound,
        "decode_fraction_of_bound": ours.median("decode_tok_s") / bound,
        "prefill_flops": flops,
        "matmul_flop_s": matmul,
        "prefill_fraction_of_matmul": flops / ours.median("ttft_s") / matmul,
        "ratios": {
            r.name: {
                "decode": ours.median("decode_tok_s") / r.median("decode_tok_s"),
                "prefill": ours.median("prefill_tok_s") / r.median("prefill_tok_s"),
                "unreliable": unreliable[r.name],  # the ratios whose runs spread > SPREAD
            }
            for r in results[1:]
        },
        "warnings": warnings,
        "decode_by_context": decode_by_context(s, results),
        "versions": versions(),
        "machine": machine(),
    }
