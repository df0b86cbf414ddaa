"""The neutral Python API: ``mistral.load`` and the Model that tests, the CLI and users share."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mistral import generate as gen
from mistral.args import ModelArgs
from mistral.backend import Runner, build
from mistral.checkpoint import read_checkpoint
from mistral.weights import RawTensor


class Model:
    """A loaded model on one backend, device and dtype."""

    def __init__(self, runner: Runner, source: str = "") -> None:
        self.runner = runner
        self.source = source

    @property
    def args(self) -> ModelArgs:
        return self.runner.args

    @property
    def backend(self) -> str:
        return self.runner.backend

    @property
    def device(self) -> str:
        return self.runner.device

    @property
    def dtype(self) -> str:
        return self.runner.dtype

    def __repr__(self) -> str:
        where = f"backend={self.backend}, device={self.device}, dtype={self.dtype}"
        return f"Model({self.source!r}, {where})"

    def logits(self, batch: list[list[int]], chunk_size: int | None = None) -> list[np.ndarray]:
        """Float32 logits, (len(row), vocab_size) per row, computed through the rotating cache."""
        return gen.all_logits(self.runner, batch, chunk_size)

    def trace(self, tokens: list[int]) -> dict[str, np.ndarray]:
        """Every named tap (mistral.taps) of one uncached forward of one row, float32 (T, ...)."""
        gen.check_batch([tokens], self.args.vocab_size)
        return self.runner.trace(list(tokens))

    def generate(
        self,
        prompts: list[list[int]],
        max_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        eos_id: int | None = None,
        chunk_size: int | None = None,
    ) -> list[list[int]]:
        """New token ids per row; greedy at temperature 0; a row stops after ``eos_id`` if given."""
        return gen.generate(
            self.runner,
            prompts,
            max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            eos_id=eos_id,
            chunk_size=chunk_size,
        )


def from_tensors(
    args: ModelArgs,
    tensors: dict[str, RawTensor],
    backend: str = "torch",
    device: str | None = None,
    dtype: str | None = None,
    source: str = "tensors",
    compile: bool = False,
) -> Model:
    """A Model from in-memory tensors named by checkpoint keys (e.g. ``weights.random_weights``)."""
    return Model(build(backend, args, tensors, device, dtype, source, compile), source)


def load(
    path: str | Path,
    backend: str = "torch",
    device: str | None = None,
    dtype: str | None = None,
    compile: bool = False,
) -> Model:
    """Loads a model folder; device and dtype are strings ("cuda:1", "bfloat16"), None = best.
    ``compile`` (torch) compiles the static-shape decode step, a CUDA graph on CUDA."""
    ckpt = read_checkpoint(path)
    return from_tensors(ckpt.args, ckpt.tensors, backend, device, dtype, str(ckpt.path), compile)
