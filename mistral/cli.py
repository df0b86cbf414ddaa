"""The ``mistral`` command: generate, chat, info, convert, and (cli_tools) diff and bench."""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import simple_parsing as sp

from mistral.checkpoint import DEFAULT_MODEL
from mistral.cli_tools import Bench, Diff
from mistral.errors import MistralError


@dataclass
class ModelOptions:
    """Which model, and where and how it runs."""

    model: str | None = None
    """Model folder (Mistral, Hugging Face or MLX layout). Default: the small KJV model shipped in
    mistral/default_model."""
    backend: str = sp.choice("torch", "mlx", default="torch")
    """Framework that runs the model."""
    device: str | None = None
    """torch: cpu, cuda, cuda:N, mps; mlx: gpu, cpu. Default: the best available."""
    dtype: str | None = sp.choice("float32", "bfloat16", "float16", default=None)
    """Compute dtype. Default: bfloat16 on CUDA and MLX's GPU, float16 on MPS, float32 on CPUs."""
    tokenizer: str | None = None
    """sentencepiece model file. Default: tokenizer.model[.v1|.v3] in the model folder."""
    compile: bool = False
    """torch: compile the static-shape decode step (torch.compile; replayed as a CUDA graph on
    CUDA). The first steps are slow while it compiles."""

    def load(self):
        """(model, tokenizer), with the tokenizer checked against the model's vocabulary."""
        from mistral.checkpoint import TOKENIZER_FILES, read_checkpoint
        from mistral.model import from_tensors
        from mistral.tokenizer import Tokenizer

        ckpt = read_checkpoint(self.model or DEFAULT_MODEL)
        tok_path = self.tokenizer or ckpt.tokenizer_path
        if tok_path is None:
            names = ", ".join(TOKENIZER_FILES)
            raise MistralError(f"{ckpt.path}: no tokenizer ({names}); pass --tokenizer FILE")
        tok = Tokenizer(tok_path)
        if tok.vocab_size > ckpt.args.vocab_size:
            raise MistralError(
                f"tokenizer {tok.path} has {tok.vocab_size} tokens but the model only "
                f"{ckpt.args.vocab_size}: they do not belong together"
            )
        model = from_tensors(
            ckpt.args,
            ckpt.tensors,
            self.backend,
            self.device,
            self.dtype,
            str(ckpt.path),
            self.compile,
        )
        return model, tok


@dataclass
class SamplingOptions:
    """How the next token is chosen."""

    max_tokens: int = 128
    """Tokens to generate per prompt (a row stops earlier at end-of-sequence)."""
    temperature: float = 0.0
    """0 is greedy; higher samples more freely."""
    top_p: float = 1.0
    """Nucleus sampling: sample among the most likely tokens holding this much probability."""
    seed: int | None = None
    """Seed of the sampler, for repeatable sampled output."""

    def kwargs(self) -> dict:
        return {"temperature": self.temperature, "top_p": self.top_p, "seed": self.seed}


@dataclass
class Generate:
    """Generate text from one or more prompts, streamed, with tokens/s at the end."""

    prompt: list[str] = sp.field(default_factory=list, action="append", nargs=None)
    """Prompt text; repeat for a batch. Without it the prompt is read from standard input."""
    chunk_size: int | None = None
    """Feed prompts in chunks of this many tokens (bounded memory for long prompts)."""
    model: ModelOptions = sp.field(default_factory=ModelOptions)
    sampling: SamplingOptions = sp.field(default_factory=SamplingOptions)

    def run(self) -> None:
        from mistral.generate import stream

        prompts = self.prompt or [read_stdin_prompt()]
        model, tok = self.model.load()
        ids = [tok.encode(p) for p in prompts]
        single = len(ids) == 1
        decoders = [tok.decoder(after=row) for row in ids]
        texts = ["" for _ in ids]
        rows: list[list[int]] = [[] for _ in ids]
        if single:
            write(prompts[0], bold=True)
        start = time.perf_counter()
        first = None
        for step in stream(
            model.runner,
            ids,
            self.sampling.max_tokens,
            eos_id=tok.eos_id,
            chunk_size=self.chunk_size,
            **self.sampling.kwargs(),
        ):
            first = first or time.perf_counter()
            for b, t in enumerate(step):
                if t is not None and t != tok.eos_id:
                    rows[b].append(t)
                    piece = decoders[b].push(t)
                    texts[b] += piece
                    if single:
                        write(piece)
        end = time.perf_counter()
        tails = [d.flush() for d in decoders]
        if single:
            write(tails[0] + "\n")
        else:
            for p, text, tail in zip(prompts, texts, tails, strict=True):
                write(p, bold=True)
                write(text + tail + "\n\n")
        report_speed(ids, rows, start, first or end, end)


def report_speed(prompts: list[list[int]], rows: list[list[int]], start, first, end) -> None:
    n_prompt = sum(map(len, prompts))
    n_new = sum(map(len, rows))
    prefill = first - start
    decode = end - first
    lines = [
        f"prompt: {n_prompt} tokens in {prefill:.2f}s ({n_prompt / max(prefill, 1e-9):.1f} tok/s)"
    ]
    if n_new > len(rows):
        # The first token of each row comes with the prefill; the rest are decode steps.
        steps = n_new - len(rows)
        lines.append(
            f"generation: {n_new} tokens, {steps / max(decode, 1e-9):.1f} tok/s after the first"
        )
    print("\n".join(lines), file=sys.stderr)


@dataclass
class Chat:
    """Chat with an instruct model: streaming answers, history kept in the cache across turns.

    Ctrl-C stops the current answer and keeps the session; Ctrl-D (end of input) leaves.
    """

    system: str | None = None
    """System prompt (placed as the model's instruct format places it)."""
    template: str | None = sp.choice("v1", "v3", default=None)
    """Prompt format: v1 ([INST] as text) or v3 ([INST] as control tokens). Default: from the
    tokenizer."""
    context: int = 4096
    """Cache length for models without a sliding window."""
    model: ModelOptions = sp.field(default_factory=ModelOptions)
    sampling: SamplingOptions = sp.field(default_factory=lambda: SamplingOptions(512, 0.35))

    def run(self) -> None:
        from mistral.chat import Chat as Conversation
        from mistral.chat import template_version

        model, tok = self.model.load()
        chat = Conversation(model, tok, self.system, self.template, self.context)
        interactive = sys.stdin.isatty()
        if interactive:
            version = self.template or template_version(tok)
            print(
                f"[{model!r}, template {version}; Ctrl-C stops an answer, Ctrl-D quits]",
                file=sys.stderr,
            )
        while True:
            try:
                text = input("> " if interactive else "")
            except (EOFError, KeyboardInterrupt):
                print(file=sys.stderr)
                return
            if not text.strip():
                continue
            answer = chat.reply(text, self.sampling.max_tokens, **self.sampling.kwargs())
            try:
                for piece in answer:
                    write(piece)
            except KeyboardInterrupt:
                answer.close()
                write(" [stopped]")
            write("\n")


@dataclass
class Info:
    """Describe a model folder: format, architecture, parameters, dtype, bytes, tokenizer."""

    path: str = sp.field(positional=True)
    """Model folder."""
    json: bool = False
    """Print JSON instead of text."""

    def run(self) -> None:
        from mistral.checkpoint import read_checkpoint
        from mistral.tokenizer import Tokenizer

        ckpt = read_checkpoint(self.path)
        params = sum(int(np.prod(t.shape)) for t in ckpt.tensors.values())
        dtypes = sorted({t.dtype for t in ckpt.tensors.values()})
        info = {
            "path": str(ckpt.path),
            "format": ckpt.format,
            "args": ckpt.args.to_params(),
            "parameters": params,
            "dtype": ",".join(dtypes),
            "bytes": sum(t.nbytes for t in ckpt.tensors.values()),
            "tokenizer": None,
        }
        if ckpt.tokenizer_path:
            from mistral.chat import template_version

            tok = Tokenizer(ckpt.tokenizer_path)
            info["tokenizer"] = {
                "file": ckpt.tokenizer_path.name,
                "vocab_size": tok.vocab_size,
                "chat_template": template_version(tok),
            }
        if self.json:
            print(json.dumps(info, indent=2))
            return
        a = ckpt.args
        kind = f"MoE {a.moe.num_experts}x, top-{a.moe.num_experts_per_tok}" if a.moe else "dense"
        window = a.sliding_window or "none"
        print(f"{ckpt.path}  ({ckpt.format} format)")
        heads = f"{a.n_heads} heads / {a.n_kv_heads} kv heads of {a.head_dim}"
        shape = f"{a.n_layers} layers, dim {a.dim}, {heads}, hidden {a.hidden_dim}"
        print(f"  architecture  {shape}, {kind}")
        print(f"  vocabulary    {a.vocab_size}")
        print(f"  rope_theta    {a.rope_theta:g}, sliding window {window}, norm_eps {a.norm_eps:g}")
        print(f"  parameters    {params:,} ({params / 1e6:,.1f} M)")
        print(f"  weights       {info['dtype']}, {info['bytes'] / 2**20:,.1f} MiB")
        t = info["tokenizer"]
        if t:
            tokens = f"{t['vocab_size']} tokens, chat template {t['chat_template']}"
            print(f"  tokenizer     {t['file']}, {tokens}")
        else:
            print("  tokenizer     none found")


@dataclass
class Convert:
    """Convert a model folder to another layout, tensor by tensor (round trips are bit-exact)."""

    src: str = sp.field(positional=True)
    """Source model folder."""
    dst: str = sp.field(positional=True)
    """Destination folder (must not exist, or be empty)."""
    to: str = sp.choice("mistral", "hf", "mlx", default="mistral")
    """Layout to write: mistral (params.json + consolidated.safetensors), hf (config.json +
    model.safetensors, wq/wk permuted), mlx (params.json + weights.npz or weights.safetensors)."""
    dtype: str | None = sp.choice("float32", "bfloat16", "float16", default=None)
    """Cast the weights. Default: keep them as they are."""

    def run(self) -> None:
        from tqdm import tqdm

        from mistral.checkpoint import TOKENIZER_FILES, read_checkpoint, write_checkpoint
        from mistral.weights import cast_nbytes

        ckpt = read_checkpoint(self.src)
        dst = Path(self.dst)
        if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
            raise MistralError(f"{dst} exists and is not empty: choose a new folder")
        total = sum(cast_nbytes(t, self.dtype) for t in ckpt.tensors.values())
        with tqdm(
            total=total, unit="B", unit_scale=True, desc=f"{ckpt.format} -> {self.to}", disable=None
        ) as bar:
            write_checkpoint(dst, self.to, ckpt.args, ckpt.tensors, self.dtype, bar.update)
        for name in TOKENIZER_FILES:
            if (ckpt.path / name).is_file():
                shutil.copy(ckpt.path / name, dst / name)
        print(f"wrote {dst} ({self.to} format)", file=sys.stderr)


COMMANDS = {
    "generate": Generate,
    "chat": Chat,
    "info": Info,
    "convert": Convert,
    "diff": Diff,
    "bench": Bench,
}


def read_stdin_prompt() -> str:
    if sys.stdin.isatty():
        raise MistralError("no prompt: pass --prompt TEXT or pipe text on standard input")
    text = sys.stdin.read()
    if not text.strip():
        raise MistralError("the prompt read from standard input is empty")
    return text.rstrip("\n")


def write(text: str, bold: bool = False) -> None:
    if bold and sys.stdout.isatty():
        text = f"\033[1m{text}\033[0m"
    sys.stdout.write(text)
    sys.stdout.flush()


class Parser(sp.ArgumentParser):
    """simple-parsing's parser with --dash-options and usage errors on one line."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("add_option_string_dash_variants", sp.DashVariant.DASH)
        kwargs.setdefault("add_config_path_arg", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parser() -> Parser:
    top = Parser(
        prog="mistral", description="Reference Mistral/Mixtral inference on PyTorch and MLX."
    )
    sub = top.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")
    for name, cls in COMMANDS.items():
        doc = (cls.__doc__ or "").strip()
        p = sub.add_parser(name, help=doc.splitlines()[0], description=doc)
        p.add_arguments(cls, dest="options")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.options.run()
    except MistralError as e:
        print(f"mistral {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return 0
