"""The Python API: ``mistral.load`` and Model, the one way users, the CLI and the tools reach a
model (its Runner, mistral.contract, stays behind it)."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Mapping
from pathlib import Path

import numpy as np

from mistral import contract
from mistral import generate as gen
from mistral.args import ModelArgs
from mistral.chat import Message, encode_messages
from mistral.checkpoint import DEFAULT_MODEL, read_checkpoint
from mistral.contract import Runner, build
from mistral.errors import MistralError
from mistral.measure import ResidentMemory
from mistral.stops import StopText
from mistral.tokenizer import Tokenizer
from mistral.weights import RawTensor


class Model:
    """A loaded model on one backend, device and dtype, with its folder's tokenizer (or None)."""

    def __init__(
        self, runner: Runner, backend: str, tokenizer: Tokenizer | None = None, source: str = ""
    ) -> None:
        self.runner = runner
        self.backend = backend
        self.tokenizer = tokenizer
        self.source = source

    @property
    def args(self) -> ModelArgs:
        return self.runner.args

    @property
    def device(self) -> str:
        return self.runner.device

    @property
    def dtype(self) -> str:
        return self.runner.dtype

    def __repr__(self) -> str:
        where = f"backend={self.backend}, device={self.device}, dtype={self.dtype}"
        return f"Model({self.source!r}, {where})"

    def share(self, data: bytes) -> bytes:
        """Rank 0's bytes on every rank when the model is split over parallel ranks (each rank
        calls it at the same point); in one process, the bytes themselves."""
        return self.runner.share(data)

    def logits(self, batch: list[list[int]], chunk_size: int | None = None) -> list[np.ndarray]:
        """Float32 logits, (len(row), vocab_size) per row, computed through the rotating cache."""
        return gen.all_logits(self.runner, batch, chunk_size)

    def trace(self, tokens: list[int]) -> dict[str, np.ndarray]:
        """Every named tap (mistral.taps) of one uncached forward of one row, float32 (T, ...)."""
        gen.check_batch([tokens], self.args.vocab_size)
        return self.runner.trace(list(tokens))

    def trace_step(self, prompt: list[int], tokens: list[int]) -> dict[str, np.ndarray]:
        """Every named tap of the cached step that follows ``prompt + tokens`` when they are fed
        as generation feeds them (the prompt, then one token a step), as that step ran: float32
        (1, ...) at its last position; the logits are the ones its next token is drawn from."""
        gen.check_batch([[*prompt, *tokens]], self.args.vocab_size)
        session = self.session(1, len(prompt) + len(tokens) + 1)
        feeds = [list(prompt), *([t] for t in tokens)]
        for rows in feeds[:-1]:
            for _ in session.feed([rows], None, last_only=True):
                pass
        with self.runner.recording() as taps:
            for _ in session.feed([feeds[-1]], None, last_only=True):
                pass
        return {name: a[-1:] for name, a in taps.items()}

    def session(self, batch: int, context: int) -> gen.Session:
        """An empty cache for ``batch`` rows of up to ``context`` tokens each (layers with a
        sliding window rotate their whole window instead, with no limit): ``stream`` continues
        it."""
        windows = [w for w in self.args.layer_windows() if w is not None]
        return gen.Session(self.runner, batch, max([context, *windows]))

    def stream(
        self,
        prompts: list[list[int]],
        max_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        eos_id: int | None = None,
        chunk_size: int | None = None,
        session: gen.Session | None = None,
        top_k: int = 0,
        min_p: float = 0.0,
        observe: Callable[[np.ndarray], None] | None = None,
    ) -> Generator[list[int | None], None, None]:
        """Yields, per step, the new token of every row (None once a row has produced
        ``eos_id``); ``session`` continues a cache that already holds earlier tokens. Sampling
        applies temperature, top_k (0: off), top_p and min_p (0: off) in that order, as
        transformers does; temperature 0 is greedy. ``observe`` sees the (B, V) float32 logits
        each step's tokens are drawn from, before they are drawn."""
        return gen.stream(
            self.runner,
            prompts,
            max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            eos_id=eos_id,
            chunk_size=chunk_size,
            session=session,
            top_k=top_k,
            min_p=min_p,
            observe=observe,
        )

    def generate(
        self,
        prompts: list[list[int]],
        max_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        eos_id: int | None = None,
        chunk_size: int | None = None,
        top_k: int = 0,
        min_p: float = 0.0,
    ) -> list[list[int]]:
        """New token ids per row; greedy at temperature 0; a row stops after ``eos_id`` if given."""
        out: list[list[int]] = [[] for _ in prompts]
        steps = self.stream(
            prompts,
            max_tokens,
            temperature,
            top_p,
            seed,
            eos_id,
            chunk_size,
            top_k=top_k,
            min_p=min_p,
        )
        for step in steps:
            for b, t in enumerate(step):
                if t is not None:
                    out[b].append(t)
        return out

    def stream_text(
        self,
        prompt: str | list[Message] | list[dict[str, str]],
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: list[str] | None = None,
        top_k: int = 0,
        min_p: float = 0.0,
    ) -> Iterator[str]:
        """Streams the text that follows ``prompt``, a string or chat messages (dicts with "role"
        and "content", as OpenAI's API takes them), up to the tokenizer's end of sequence or the
        first of the ``stop`` texts (not included)."""
        tok = self.require_tokenizer()
        ids = tok.encode(prompt) if isinstance(prompt, str) else encode_messages(tok, prompt)
        decoder, stops = tok.decoder(after=ids), StopText(stop or [])
        steps = self.stream(
            [ids], max_tokens, temperature, top_p, seed, tok.eos_id, top_k=top_k, min_p=min_p
        )
        for (token,) in steps:
            if token is None or token == tok.eos_id:
                break
            if piece := stops.push(decoder.push(token)):
                yield piece
            if stops.stopped:
                steps.close()
                return
        if tail := stops.push(decoder.flush()) + stops.flush():
            yield tail

    def generate_text(
        self,
        prompt: str | list[Message] | list[dict[str, str]],
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: list[str] | None = None,
        top_k: int = 0,
        min_p: float = 0.0,
    ) -> str:
        """The text that follows ``prompt`` (see ``stream_text``), whole."""
        pieces = self.stream_text(prompt, max_tokens, temperature, top_p, seed, stop, top_k, min_p)
        return "".join(pieces)

    def peak_memory(self) -> tuple[int, str]:
        """The most memory the run has held so far, and of what: the device's (CUDA, Metal) or
        the process's resident memory (CPUs, MPS)."""
        meter = contract.backend(self.backend).meter(self.args, self.device, self.dtype)
        if meter.on_device:
            return meter.peak(), "device"
        return ResidentMemory.status("VmHWM") or ResidentMemory.current(), "resident"

    def require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise MistralError(f"{self.source}: no tokenizer was found beside the model")
        return self.tokenizer


def from_tensors(
    args: ModelArgs,
    tensors: Mapping[str, RawTensor],
    backend: str = "torch",
    device: str | None = None,
    dtype: str | None = None,
    source: str = "tensors",
    compile: bool = False,
    tokenizer: Tokenizer | None = None,
    parallel: str | None = None,
    fp8: str = "keep",
) -> Model:
    """A Model from in-memory tensors named by checkpoint keys (e.g. ``weights.random_weights``)."""
    runner = build(backend, args, tensors, device, dtype, source, compile, parallel, fp8)
    return Model(runner, backend, tokenizer, source)


def load(
    path: str | Path | None = None,
    backend: str = "torch",
    device: str | None = None,
    dtype: str | None = None,
    compile: bool = False,
    tokenizer: str | Path | None = None,
    parallel: str | None = None,
    fp8: str = "keep",
) -> Model:
    """Loads a model folder (None: the embedded model) with its tokenizer; device and dtype are
    strings ("cuda:1", "bfloat16"), None = the best available. ``compile`` (torch) compiles the
    static-shape decode step, a CUDA graph on CUDA. ``tokenizer`` overrides the folder's.
    ``parallel="tensor"`` in a process started by torchrun: this rank's share of the model
    (heads and hidden units split, mistral/parallel.py), every rank returning the same logits.
    FP8 weights (mistral/fp8.py) stay e4m3 bytes, dequantized where each projection runs;
    ``fp8="dequantize"`` dequantizes them at load to the run's dtype (twice the memory, faster);
    ``fp8="scaled"`` multiplies them in FP8, the activations quantized to e4m3 too (torch's
    torch._scaled_mm; MLX emulates it in float32)."""
    ckpt = read_checkpoint(DEFAULT_MODEL if path is None else path)
    tok_path = tokenizer or ckpt.tokenizer_path
    tok = None if tok_path is None else Tokenizer(tok_path)
    if tok is not None and tok.vocab_size > ckpt.args.vocab_size:
        raise MistralError(
            f"tokenizer {tok.path} has {tok.vocab_size} tokens but the model only "
            f"{ckpt.args.vocab_size}: they do not belong together"
        )
    source = str(ckpt.path)
    return from_tensors(
        ckpt.args, ckpt.tensors, backend, device, dtype, source, compile, tok, parallel, fp8
    )
