"""The checking commands: diff (where two sides part ways) and bench (speed and memory)."""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import simple_parsing as sp

from mistral.args import ModelArgs
from mistral.bench import BenchSetup, run_bench
from mistral.bench_report import format_report
from mistral.bench_report import plot as plot_bench
from mistral.checkpoint import CONFIGS, DEFAULT_MODEL, Checkpoint, read_checkpoint
from mistral.cli.options import launcher_rank
from mistral.contract import BACKENDS, FP8_MODES
from mistral.diff import continuation, load_side, precision_of, run_diff
from mistral.diff import plot as plot_diff
from mistral.errors import MistralError
from mistral.tokenizer import Tokenizer
from mistral.weights import expected_shapes, random_weights


def require_matplotlib(option: str) -> None:
    """Refuses, before any work, a plot without matplotlib installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MistralError(
            f"{option} needs matplotlib: pip install matplotlib (or the extra: pip install "
            "'mistral-reference[plot]')"
        ) from None


def check_destinations(*paths: str | None) -> None:
    """Refuses, before any work, an output file whose folder does not exist."""
    for path in paths:
        if path is not None and not Path(path).resolve().parent.is_dir():
            raise MistralError(f"cannot write {path}: its folder does not exist")


@dataclass
class Diff:
    """Find where two backends (or a backend and an outside reference) part ways, tap by tap.

    Runs the same tokens through side a and side b and prints, per tap (embeddings; per layer
    the attention norm, q/k after RoPE, attention output, feed-forward norm, MoE router logits
    and chosen experts, feed-forward output, residual; final norm; logits) the max |a-b|,
    relative error and cosine similarity, then names the first tap beyond its dtype pair's
    tolerance and says whether the error jumps at one place or grows layer by layer. Exits 1
    when the sides disagree.
    """

    model: str | None = None
    """Model folder of side a (default: the embedded model)."""
    b_model: str | None = None
    """Model folder of side b, to compare checkpoint formats of one model (default: --model)."""
    a: str = "torch:cpu:float32"
    """Side a: backend[:device[:dtype]], backend one of torch, mlx, hf (transformers), mlx-lm."""
    b: str = "mlx:cpu:float32"
    """Side b, as --a."""
    a_fp8: str = sp.choice(*FP8_MODES, default="keep")
    """What side a (one of our backends) makes of an FP8 folder's weights, as generate's --fp8:
    keep, dequantize (the same weights), or scaled (FP8 products, the activations quantized
    too; MLX emulates them)."""
    b_fp8: str = sp.choice(*FP8_MODES, default="keep")
    """Side b's, as --a-fp8 (--model F --a torch --b torch --b-fp8 scaled: what quantizing the
    activations changes)."""
    prompt: str | None = None
    """Text to run (needs the model's tokenizer)."""
    tokens: str | None = None
    """Comma-separated token ids to run instead of --prompt."""
    generate: int = 0
    """Decode this many tokens greedily on both sides; show both continuations as text and the taps
    of the first step where the tokens differ, as each side chose its token there."""
    json: str | None = None
    """Write the whole report as JSON to this file."""
    plot: str | None = None
    """Draw the relative error of every tap along the forward (embeddings, each layer, final norm,
    logits) to this PNG file (needs matplotlib)."""

    def run(self) -> None:
        check_destinations(self.json, self.plot)
        if self.plot:
            require_matplotlib("--plot")
        if self.generate < 0:
            raise MistralError(f"--generate must be >= 0, got {self.generate}")
        ckpt_a = read_checkpoint(self.model or DEFAULT_MODEL)
        ckpt_b = read_checkpoint(self.b_model) if self.b_model else ckpt_a
        if expected_shapes(ckpt_a.args) != expected_shapes(ckpt_b.args):
            raise MistralError(f"{ckpt_a.path} and {ckpt_b.path} have different shapes")
        params_a, params_b = ckpt_a.args.to_params(), ckpt_b.args.to_params()
        for key in dict.fromkeys([*params_a, *params_b]):
            if params_a.get(key) != params_b.get(key):  # a likely cause of what follows
                print(
                    f"note: {key} is {params_a.get(key)} in side a's folder, "
                    f"{params_b.get(key)} in side b's"
                )
        tokenizer = None
        if (tok_path := ckpt_a.tokenizer_path or ckpt_b.tokenizer_path) is not None:
            try:
                tokenizer = Tokenizer(tok_path)
            except MistralError:
                if not self.tokens:  # with --tokens it would only have shown the text
                    raise
        ids = self.token_ids(tokenizer, ckpt_a)
        decode = continuation(tokenizer) if tokenizer is not None else None
        side_a, side_b = (
            load_side(self.a, ckpt_a, self.a_fp8),
            load_side(self.b, ckpt_b, self.b_fp8),
        )
        if ckpt_b is ckpt_a and self.a_fp8 == self.b_fp8:  # one folder's codes on both sides:
            precisions = (side_a[1].dtype, side_b[1].dtype)  # the dtypes' rounding alone
        else:
            precisions = (
                precision_of(ckpt_a, side_a[1].dtype, self.a_fp8),
                precision_of(ckpt_b, side_b[1].dtype, self.b_fp8),
            )
        report = run_diff(side_a, side_b, ids, self.generate, decode, precisions)
        report.a_model, report.b_model = str(ckpt_a.path), str(ckpt_b.path)
        print(report.table())
        if self.json:
            Path(self.json).write_text(json.dumps(report.to_json(), indent=2))
        if self.plot:
            plot_diff(report, self.plot)
        if not report.agree:
            raise SystemExit(1)

    def token_ids(self, tokenizer: Tokenizer | None, ckpt: Checkpoint) -> list[int]:
        """--tokens, or --prompt (default "In the beginning") through the tokenizer."""
        if self.tokens:
            try:
                return [int(t) for t in self.tokens.replace(" ", "").split(",") if t]
            except ValueError:
                raise MistralError(
                    f"--tokens: not a comma-separated list of ids: {self.tokens!r}"
                ) from None
        if tokenizer is None:
            raise MistralError(f"{ckpt.path} has no tokenizer: pass --tokens")
        return tokenizer.encode(self.prompt or "In the beginning")


@dataclass
class Bench:
    """Measure prefill and decode speed and peak memory, optionally against transformers and
    mlx-lm on the same weights in the same run.

    Prints median and spread over --repeats runs after --warmup runs, the ratio ours/theirs (said to
    be unreliable when a figure's runs spread more than 2x), and the memory-bandwidth bound of
    decode (bytes read per step over the measured copy bandwidth).
    """

    model: str | None = None
    """Model folder to measure (default: the embedded model unless --config is given)."""
    config: str | None = None
    """A shape from mistral/configs/ (e.g. mistral-7b-v0.1, small-bench) or a params.json path; the
    weights are seeded random, so real shapes need no download."""
    random_weights: bool = False
    """Use seeded random weights (implied by --config)."""
    window: int | None = None
    """Override the sliding window of --config (e.g. to measure memory past the window)."""
    backend: str = sp.choice(*BACKENDS, default="torch")
    """Our backend to measure."""
    device: str | None = None
    """Device, as for generate (default: the best available)."""
    dtype: str | None = sp.choice("float32", "bfloat16", "float16", default=None)
    """Compute dtype (default: as for generate)."""
    prompt_len: int = 512
    """Prompt tokens per row."""
    gen_len: int = 128
    """Tokens generated per row."""
    batch: int = 1
    """Rows decoded together."""
    chunk_size: int | None = None
    """Prefill in chunks of this many tokens."""
    repeats: int = 5
    """Measured runs; the report gives their median and spread."""
    warmup: int = 1
    """Runs before measuring (allocations, kernel selection, compilation); memory is measured in
    them, each implementation's before the next is built."""
    compare: str = ""
    """Comma-separated references to run on the same weights: hf, mlx-lm."""
    compile: bool = False
    """torch: compile the decode step (torch.compile; a CUDA graph on CUDA)."""
    fp8: str = sp.choice(*FP8_MODES, default="keep")
    """What becomes of an FP8 folder's weights, as generate's --fp8: keep (e4m3 bytes, dequantized
    where each projection runs), dequantize (at load), or scaled (FP8 products)."""
    parallel: str | None = sp.choice("tensor", "pipeline", default=None)
    """Measure one model split over the ranks torchrun or mlx.launch started (as generate's
    --parallel): rank 0 prints the report; every rank prints one line with the memory its share
    added at its peak."""
    json: str | None = None
    """Also write the report as JSON to this file (with the package versions and the machine)."""
    plot: str | None = None
    """Draw decode tokens/s against the context length, one line per implementation, to this PNG
    file (the decode steps of the measured runs, binned by their context length; needs
    matplotlib)."""

    def run(self) -> None:
        check_destinations(self.json, self.plot)
        if self.plot:
            require_matplotlib("--plot")
        if self.config:
            path = Path(self.config)
            if not path.exists():
                path = CONFIGS / f"{self.config}.json"
            if not path.exists():
                raise MistralError(
                    f"no config {self.config!r} (a name from mistral/configs/ or a path)"
                )
            args = ModelArgs.from_file(path)
            if self.window is not None:
                args = dataclasses.replace(args, sliding_window=self.window)
            tensors = random_weights(args, seed=0, dtype=self.dtype or "float32")
            source = f"{path.stem} (random weights)"
        else:
            ckpt = read_checkpoint(self.model or DEFAULT_MODEL)
            args, tensors, source = ckpt.args, ckpt.tensors, str(ckpt.path)
            if self.random_weights:
                tensors = random_weights(args, seed=0, dtype=self.dtype or "float32")
        for name, value in (
            ("prompt-len", self.prompt_len),
            ("gen-len", self.gen_len),
            ("batch", self.batch),
            ("repeats", self.repeats),
            ("warmup", self.warmup),
        ):
            if value < 1 or (name == "gen-len" and value < 2):
                raise MistralError(f"--{name} must be at least {2 if name == 'gen-len' else 1}")
        compare = tuple(c for c in self.compare.replace(" ", "").split(",") if c)
        for c in compare:
            if c not in ("hf", "mlx-lm"):
                raise MistralError(f"--compare: unknown reference {c!r} (use hf, mlx-lm)")
        if self.parallel and compare:
            raise MistralError("--compare runs one process: not with --parallel")
        setup = BenchSetup(
            args,
            tensors,
            source,
            self.backend,
            self.device,
            self.dtype,
            self.prompt_len,
            self.gen_len,
            self.batch,
            self.repeats,
            self.warmup,
            self.chunk_size,
            compare,
            self.compile,
            self.parallel,
            self.fp8,
        )
        rank = launcher_rank() if self.parallel else 0
        report = run_bench(
            setup, progress=lambda msg: rank or print(msg, file=sys.stderr, flush=True)
        )
        if self.parallel:  # each rank's own memory; the rest of the report is every rank's
            added = report["results"][0]["peak_bytes"]["median"] / 2**20
            print(f"rank {rank}: ours added {added:,.1f} MiB at its peak", file=sys.stderr)
        if rank:
            return
        print(format_report(report))
        if self.json:
            Path(self.json).write_text(json.dumps(report, indent=2))
        if self.plot:
            plot_bench(report, self.plot)
