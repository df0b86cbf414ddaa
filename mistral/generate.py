"""The generation loop, framework-neutral: chunked prefill, then one token per row per step."""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Generator, Iterator

import numpy as np

from mistral.cache import Planner
from mistral.contract import Cache, Runner
from mistral.errors import MistralError
from mistral.measure import memory_limit
from mistral.sampling import sample
from mistral.weights import cache_bytes


def check_batch(batch: list[list[int]], vocab_size: int) -> None:
    """Rejects empty batches, empty rows and ids outside the vocabulary, naming the row."""
    if not isinstance(batch, list | tuple):
        kind = type(batch).__name__
        raise MistralError(f"the batch must be a list of rows of token ids, not a {kind}")
    if not batch:
        raise MistralError("the batch is empty")
    for i, row in enumerate(batch):
        if not isinstance(row, list | tuple | np.ndarray):
            raise MistralError(f"row {i} is not a list of integer token ids")
        if len(row) == 0:
            raise MistralError(f"row {i} is empty")
        a = np.asarray(row)
        if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
            raise MistralError(f"row {i} is not a list of integer token ids")
        bad = a[(a < 0) | (a >= vocab_size)]
        if len(bad):
            raise MistralError(
                f"row {i}: token id {int(bad[0])} is outside the vocabulary [0, {vocab_size})"
            )


def is_int(x: object) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


def check_options(
    max_tokens: int,
    temperature: float,
    top_p: float,
    seed: int | None,
    chunk_size: int | None,
    top_k: int = 0,
    min_p: float = 0.0,
) -> None:
    """Refuses, naming it, a generation option of the wrong type or out of range (NaN too)."""
    if not is_int(max_tokens) or max_tokens < 0:
        raise MistralError(f"max_tokens must be >= 0 (an integer), got {max_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, int | float):
        raise MistralError(f"temperature must be a number, got {temperature!r}")
    if not 0 <= temperature < math.inf:
        raise MistralError(f"temperature must be >= 0 and finite (0 is greedy), got {temperature}")
    if isinstance(top_p, bool) or not isinstance(top_p, int | float) or not 0 < top_p <= 1:
        raise MistralError(f"top_p must be in (0, 1], got {top_p!r}")
    if seed is not None and (not is_int(seed) or seed < 0):
        raise MistralError(f"seed must be an integer >= 0 or None, got {seed!r}")
    if chunk_size is not None and (not is_int(chunk_size) or chunk_size <= 0):
        raise MistralError(f"chunk_size must be positive, got {chunk_size!r}")
    if not is_int(top_k) or top_k < 0:
        raise MistralError(f"top_k must be an integer >= 0 (0 keeps every token), got {top_k!r}")
    if isinstance(min_p, bool) or not isinstance(min_p, int | float) or not 0 <= min_p < 1:
        raise MistralError(f"min_p must be in [0, 1) (0 keeps every token), got {min_p!r}")


def pad(rows: list[list[int]]) -> np.ndarray:
    """(B, T) int64 ids, zero-padded on the right."""
    out = np.zeros((len(rows), max(len(r) for r in rows)), dtype=np.int64)
    for b, r in enumerate(rows):
        out[b, : len(r)] = r
    return out


def check_fits(runner: Runner, batch: int, context: int) -> None:
    """Refuses, before allocating, caches larger than the memory the process may have (e.g.
    max_tokens 1e9 on a model without a sliding window, whose cache grows with the run)."""
    itemsize = 4 if runner.dtype == "float32" else 2
    need, have = cache_bytes(runner.args, itemsize, batch, context), memory_limit()
    if have and need > have:
        raise MistralError(
            f"a cache for {batch} row(s) of {context:,} tokens needs {need / 2**30:,.1f} GiB, "
            f"more than the {have / 2**30:,.1f} GiB this process may have: ask for fewer tokens"
        )


class Session:
    """One batch of rows with their cache: feed tokens, get logits. Chat keeps one across turns."""

    def __init__(self, runner: Runner, batch: int, context: int) -> None:
        check_fits(runner, batch, context)
        self.runner = runner
        try:
            self.planner = Planner(batch, context, runner.args.layer_windows())
            self.cache: Cache = runner.new_cache(batch, self.planner.sizes)
        except (MemoryError, RuntimeError) as e:  # numpy's, torch's or MLX's allocation
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise MistralError(
                f"no memory for a cache of {batch} row(s) of {context:,} tokens ({first})"
            ) from None

    def feed(
        self, rows: list[list[int]], chunk_size: int | None, last_only: bool
    ) -> Iterator[tuple[list[int], np.ndarray]]:
        """Feeds rows their new tokens (maybe none) in chunks of ``chunk_size`` (None: of the
        longest window when every layer has one, so a prompt's masks and activations grow
        linearly with its length; else whole); yields (seqlens, logits) per chunk."""
        longest = max(len(r) for r in rows)
        windows = self.runner.args.layer_windows()
        whole = longest if None in windows else max(windows)
        chunk = whole if chunk_size is None else chunk_size
        if not is_int(chunk) or chunk <= 0:
            raise MistralError(f"chunk_size must be positive, got {chunk_size!r}")
        for start in range(0, longest, chunk):
            pieces = [r[start : start + chunk] for r in rows]
            seqlens = [len(p) for p in pieces]
            plans = self.planner.step(seqlens)
            yield seqlens, self.runner.forward(pad(pieces), plans, self.cache, last_only)


def all_logits(runner: Runner, batch: list[list[int]], chunk_size: int | None) -> list[np.ndarray]:
    check_batch(batch, runner.args.vocab_size)
    longest = max(len(r) for r in batch)
    session = Session(runner, len(batch), longest)
    outs: list[list[np.ndarray]] = [[] for _ in batch]
    for seqlens, logits in session.feed(batch, chunk_size, last_only=False):
        for b, n in enumerate(seqlens):
            outs[b].append(logits[b, :n])
    return [np.concatenate(o) for o in outs]


def stream(
    runner: Runner,
    prompts: list[list[int]],
    max_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    eos_id: int | None = None,
    chunk_size: int | None = None,
    session: Session | None = None,
    top_k: int = 0,
    min_p: float = 0.0,
    observe: Callable[[np.ndarray], None] | None = None,
) -> Generator[list[int | None], None, None]:
    """Yields, per step, the new token of every row (None once a row has produced ``eos_id``);
    ``observe`` sees the (B, V) float32 logits each step's tokens are drawn from, first."""
    check_batch(prompts, runner.args.vocab_size)
    check_options(max_tokens, temperature, top_p, seed, chunk_size, top_k, min_p)
    if session is None:
        longest = max(len(p) for p in prompts) + max_tokens
        session = Session(runner, len(prompts), longest)
    if seed is None and temperature > 0:  # parallel ranks draw rank 0's seed, so the same tokens
        seed = int.from_bytes(runner.share(secrets.token_bytes(8)), "little")
    rng = np.random.default_rng(seed)
    B = len(prompts)
    last = np.zeros((B, runner.args.vocab_size), dtype=np.float32)
    for seqlens, logits in session.feed(prompts, chunk_size, last_only=True):
        for b, n in enumerate(seqlens):
            if n:  # the row's last logits so far; its final chunk leaves the prompt's last
                last[b] = logits[b]
    done = np.zeros(B, dtype=bool)
    for i in range(max_tokens):
        if observe is not None:
            observe(last)
        tokens = sample(last, temperature, top_p, rng, top_k, min_p)
        yield [None if d else int(t) for t, d in zip(tokens, done, strict=True)]
        if eos_id is not None:
            done |= tokens == eos_id
        if done.all() or i == max_tokens - 1:
            return
        rows = [[] if d else [int(t)] for t, d in zip(tokens, done, strict=True)]
        [(_, logits)] = session.feed(rows, None, last_only=True)
        last = np.where(done[:, None], last, logits)
