"""Options shared by the commands that run a model, and terminal output."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import simple_parsing as sp

import mistral
from mistral.checkpoint import DEFAULT_MODEL, TOKENIZER_FILES, read_checkpoint
from mistral.contract import BACKENDS, FP8_MODES
from mistral.errors import MistralError


@dataclass
class ModelOptions:
    """Which model, and where and how it runs."""

    model: str | None = None
    """Model folder (Mistral, Hugging Face or MLX layout). Default: the small KJV model shipped in
    mistral/default_model."""
    backend: str = sp.choice(*BACKENDS, default="torch")
    """Framework that runs the model."""
    device: str | None = None
    """torch: cpu, cuda, cuda:N, mps; mlx: gpu, cpu. Default: the best available."""
    dtype: str | None = sp.choice("float32", "bfloat16", "float16", default=None)
    """Compute dtype. Default: bfloat16 on CUDA and MLX's GPU, float16 on MPS, float32 on CPUs."""
    tokenizer: str | None = None
    """Tokenizer file, sentencepiece or tekken JSON. Default: the model folder's tekken.json or
    tokenizer.model[.v7|.v3|...]."""
    compile: bool = False
    """torch: compile the static-shape decode step (torch.compile; replayed as a CUDA graph on
    CUDA). The first steps are slow while it compiles."""
    parallel: str | None = sp.choice("tensor", "pipeline", default=None)
    """Split the model over the ranks torchrun or mlx.launch started (torchrun --nproc-per-node
    N -m mistral generate ... --parallel tensor): tensor, each rank a share of every layer's heads
    and hidden units; pipeline, each a block of whole layers. Rank 0 alone prints."""
    fp8: str = sp.choice(*FP8_MODES, default="keep")
    """What becomes of an FP8 folder's weights. keep: they stay e4m3 bytes (half bfloat16's
    memory), dequantized a block of rows at a time where each projection runs; dequantize: once,
    at load, to the run's dtype (twice keep's memory, faster products); scaled: kept and
    multiplied in FP8 (torch._scaled_mm, on CUDA GPUs of compute capability 8.9+ and the CPU;
    MLX, which has none, emulates it in float32), the activations quantized to e4m3 too (the
    folder's static scale, or per token and block of inputs), as vLLM's and transformers' FP8
    kernels do. keep and dequantize multiply the same weights (their logits differ at most by
    the product kernels' order of summation)."""

    def load(self) -> mistral.Model:
        """The model with its tokenizer (--tokenizer, or the one in the folder), which it needs:
        checked before the weights go to the device."""
        folder = read_checkpoint(self.model or DEFAULT_MODEL)
        if self.tokenizer is None and folder.tokenizer_path is None:
            names = ", ".join(TOKENIZER_FILES)
            raise MistralError(f"{folder.path}: no tokenizer ({names}); pass --tokenizer FILE")
        model = mistral.load(
            folder.path,
            self.backend,
            self.device,
            self.dtype,
            self.compile,
            self.tokenizer,
            self.parallel,
            self.fp8,
        )
        if self.parallel and launcher_rank():  # one rank speaks for all
            sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - for the process
        return model


def launcher_rank() -> int:
    """This process's rank as torchrun (RANK) or mlx.launch (MLX_RANK) numbered it; 0 alone."""
    value = os.environ.get("RANK", os.environ.get("MLX_RANK", "0"))
    return int(value) if value.isdigit() else 0


@dataclass
class SamplingOptions:
    """How the next token is chosen."""

    max_tokens: int = 128
    """Tokens to generate per prompt (a row stops earlier at end-of-sequence)."""
    temperature: float = 0.0
    """0 is greedy; higher samples more freely."""
    top_k: int = 0
    """Sample among the K most likely tokens only (0: no limit)."""
    top_p: float = 1.0
    """Nucleus sampling: sample among the most likely tokens holding this much probability."""
    min_p: float = 0.0
    """Drop tokens less likely than this fraction of the most likely one's (0: keep all)."""
    seed: int | None = None
    """Seed of the sampler, for repeatable sampled output."""

    def kwargs(self) -> dict:
        """Applied in transformers' order: temperature, top-k, top-p, min-p."""
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "top_k": self.top_k,
            "min_p": self.min_p,
        }


def read_stdin_prompt() -> str:
    if sys.stdin.isatty():
        raise MistralError("no prompt: pass --prompt TEXT or pipe text on standard input")
    try:
        text = sys.stdin.read()
    except UnicodeDecodeError as e:
        raise MistralError(f"standard input is not valid UTF-8 (byte {e.start})") from None
    if not text.strip():
        raise MistralError("the prompt read from standard input is empty")
    return text.rstrip("\n")


def write(text: str, bold: bool = False) -> None:
    if bold and sys.stdout.isatty():
        text = f"\033[1m{text}\033[0m"
    sys.stdout.write(text)
    sys.stdout.flush()
