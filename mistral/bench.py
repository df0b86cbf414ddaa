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
multiplied the way the projections multiply there.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from mistral.api import Model, from_tensors
from mistral.args import ModelArgs
from mistral.contract import REFERENCES, backend, reference
from mistral.measure import Meter, Timing, held_now, timed_run
from mistral.weights import RawTensor


@dataclass
class Result:
    name: str
    device: str
    dtype: str
    prefill_tok_s: list[float] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    decode_tok_s: list[float] = field(default_factory=list)
    peak_bytes: list[int] = field(default_factory=list)

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
                "runs": values,
            }
        return out


def random_prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(3, vocab, (batch, length)).tolist()


def decode_bytes(
    args: ModelArgs, tensors: dict[str, RawTensor], dtype_bytes: int, context: int, batch: int
) -> int:
    """Bytes one decode step reads: the weights it uses and the KV cache in use."""
    total = 0
    for name, t in tensors.items():
        n = int(np.prod(t.shape)) * dtype_bytes
        if name == "tok_embeddings.weight" and not args.tied_embeddings:
            n = t.shape[1] * dtype_bytes * batch  # one row per token (tied: the output's weight)
        elif ".experts." in name and args.moe:
            n = n * min(1.0, batch * args.moe.num_experts_per_tok / args.moe.num_experts)
        total += int(n)
    keys = sum(min(context, w or context) for w in args.layer_windows())  # over the layers
    kv = 2 * args.n_kv_heads * args.head_dim * keys * dtype_bytes * batch
    return total + kv


def prefill_flops(args: ModelArgs, prompt_len: int, batch: int) -> int:
    """Floating-point operations (2 per multiply-add) one prefill needs: every projection for each
    prompt token (of the experts, the chosen ones), attention over the keys each token sees, and
    the output projection for the last token of each row only, as ours computes."""
    a = args
    attention = a.dim * a.head_dim * (2 * a.n_heads + 2 * a.n_kv_heads)  # wq, wk, wv, wo
    ffn = 3 * a.dim * a.hidden_dim
    if a.moe:
        ffn = ffn * a.moe.num_experts_per_tok + a.dim * a.moe.num_experts  # chosen experts, gate
    seen = sum(  # keys seen, over the queries and the layers
        sum(min(t, w or prompt_len) for t in range(1, prompt_len + 1)) for w in a.layer_windows()
    )
    per_row = a.n_layers * prompt_len * (attention + ffn) + 2 * a.n_heads * a.head_dim * seen
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
) -> tuple[list[Result], list[float]]:
    """Runs the (warm) implementations in turn, one round per repeat, with a copy bandwidth
    measured each round: a machine that slows down mid-bench slows all of them alike."""
    results = [Result(name, device, dtype) for name, device, dtype, _ in runs]
    bandwidths = []
    for i in range(repeats):
        for result, (_, _, _, run) in zip(results, runs, strict=True):
            t = run()
            result.ttft_s.append(t.prefill_s)
            result.prefill_tok_s.append(batch * prompt_len / t.prefill_s)
            result.decode_tok_s.append(batch * (gen_len - 1) / max(t.decode_s, 1e-12))
        bandwidths.append(bandwidth())
        if progress:
            progress(f"round {i + 1}/{repeats}")
    return results, bandwidths


def our_run(
    model: Model, meter: Meter, prompts: list[list[int]], gen_len: int, chunk_size: int | None
) -> Callable[[], Timing]:
    """One timed run of the generation loop users call (greedy)."""

    def run() -> Timing:
        steps = model.stream(prompts, gen_len, chunk_size=chunk_size)
        return timed_run(meter, lambda: next(steps), lambda: list(steps))

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


def run_bench(s: BenchSetup, progress: Callable[[str], None] | None = None) -> dict:
    """Measures our backend, then each reference asked for, on the same weights and prompts."""
    prompts = random_prompts(s.batch, s.prompt_len, s.args.vocab_size)
    # Each implementation is built, then warmed up (and its memory measured) before the next is
    # built, so that what it adds to the process is its own.
    meter = backend(s.backend).meter(s.args, s.device, s.dtype)
    before = held_now(meter)
    model = from_tensors(s.args, s.tensors, s.backend, s.device, s.dtype, s.source, s.compile)
    name = f"ours ({s.backend})"
    runs = [
        (name, model.device, model.dtype, our_run(model, meter, prompts, s.gen_len, s.chunk_size))
    ]
    memory = [warm_up(name, runs[0][3], s.warmup, before, progress)]
    for ref in s.compare:
        before = held_now(backend(REFERENCES[ref]).meter(s.args, s.device, model.dtype))
        side = reference(ref, s.args, s.tensors, s.device, model.dtype)
        runs.append((ref, side.device, side.dtype, side.timed(prompts, s.gen_len)))
        memory.append(warm_up(ref, runs[-1][3], s.warmup, before, progress))
    results, bandwidths = measure_rounds(
        runs, s.batch, s.prompt_len, s.gen_len, s.repeats, meter.copy_bandwidth, progress
    )
    for result, added in zip(results, memory, strict=True):
        result.peak_bytes = added
    return report(s, meter, results, float(statistics.median(bandwidths)))


def report(s: BenchSetup, meter: Meter, results: list[Result], bandwidth: float) -> dict:
    """The figures of a bench as a JSON-able dict: results, ratios, and the two bounds."""
    context = s.prompt_len + s.gen_len // 2  # keys read by the average decode step
    dtype_bytes = 4 if meter.dtype == "float32" else 2
    step_bytes = decode_bytes(s.args, s.tensors, dtype_bytes, context, s.batch)
    bound = s.batch * bandwidth / step_bytes
    ours = results[0]
    flops = prefill_flops(s.args, s.prompt_len, s.batch)
    matmul = meter.matmul_throughput()
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
            }
            for r in results[1:]
        },
    }


def format_report(report: dict) -> str:
    s = report["setup"]
    lines = [
        f"{s['source']}: batch {s['batch']}, prompt {s['prompt_len']}, generate "
        f"{s['gen_len']}, {s['device']} {s['dtype']} ({s['products']}), median of "
        f"{s['repeats']} (min-max)",
        "",
    ]
    head = f"{'':<16}{'prefill tok/s':>24}{'TTFT ms':>24}{'decode tok/s':>22}{'peak MiB':>10}"
    lines.append(head)

    def cell(r: dict, key: str, scale: float = 1.0, fmt: str = ".1f") -> str:
        m, lo, hi = (r[key][k] * scale for k in ("median", "min", "max"))
        return f"{m:{fmt}} ({lo:{fmt}}-{hi:{fmt}})"

    for r in report["results"]:
        prefill, ttft = cell(r, "prefill_tok_s"), cell(r, "ttft_s", 1e3)
        decode, peak = cell(r, "decode_tok_s"), r["peak_bytes"]["median"] / 2**20
        lines.append(f"{r['name']:<16}{prefill:>24}{ttft:>24}{decode:>22}{peak:>10.0f}")
    lines.append("")
    for name, ratio in report["ratios"].items():
        lines.append(
            f"ours / {name}: decode x{ratio['decode']:.2f}, prefill x{ratio['prefill']:.2f}"
        )
    lines.append(
        "peak MiB: what each adds to the process at its peak (weights, cache, activations)"
    )
    bw = report["bandwidth_bytes_s"] / 1e9
    step = report["decode_bytes_per_step"] / 2**20
    lines.append(
        f"decode bound: {step:.0f} MiB read per step at {bw:.1f} GB/s (copy) = "
        f"{report['decode_bound_tok_s']:.1f} tok/s; ours reaches "
        f"{report['decode_fraction_of_bound']:.0%}"
    )
    flop_s = report["prefill_fraction_of_matmul"] * report["matmul_flop_s"]
    lines.append(
        f"prefill: {report['prefill_flops'] / 1e9:.1f} GFLOP at {flop_s / 1e12:.3f} TFLOP/s = "
        f"{report['prefill_fraction_of_matmul']:.0%} of a large square product here "
        f"({report['matmul_flop_s'] / 1e12:.3f} TFLOP/s, as the projections multiply)"
    )
    return "\n".join(lines)
