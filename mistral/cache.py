"""Cache bookkeeping shared by both backends: which token sits in which slot, and who sees whom.

Everything here is numpy. A backend only gathers, scatters and attends with what it is given.

Each row of a batch owns a rotating buffer of ``size`` slots. A token at absolute position ``p``
goes to slot ``p % size``; ``slot_pos[b, s]`` is the position each slot holds (-1 while empty).
Every key, cached or new, carries its absolute position, so one rule gives every mask:

    key k is visible to query q  iff  same row, k holds a token, pos(k) <= pos(q)
                                      and pos(q) - pos(k) < window (when the model has one)

Worked example: window 4, buffer size 4, one row that has already seen 6 tokens (positions 0..5), so
``slot_pos = [4, 5, 2, 3]`` (slot = pos % 4). A chunk of 3 new tokens arrives:

    positions  = [6, 7, 8]
    stored     = all 3 (at most ``size`` newest are kept), slots [6 % 4, 7 % 4, 8 % 4] = [2, 3, 0]
    keys       = the 4 cached slots, then the 3 new tokens: positions [4, 5, 2, 3 | 6, 7, 8]
    mask (q\\k)      4  5  2  3 | 6  7  8
        q=6         1  1  0  1 | 1  0  0      6-2 = 4 is not < 4: position 2 has left the window
        q=7         1  1  0  0 | 1  1  0
        q=8         0  1  0  0 | 1  1  1      and position 4 has left it for q=8
    slot_pos after = [8, 5, 6, 7]

Attention here must read the old cache before the chunk overwrites slots 2 and 3 (position 3 is
still visible to q=6), so the plan says ``key_layout="cache+new"``. A decoded token only ever
evicts a position that has just left its window, so for decode the plan says
``key_layout="cache"``: the backend writes first and attends over the buffer alone (a static
shape). A first prefill, with nothing cached, attends over the new tokens alone:
``key_layout="new"``; so does a forward without a cache (training, tracing).

Rows of a batch may differ in both new and cached lengths: new tokens are laid out padded, (B, T)
with T the longest; padding is never stored and its queries see every key (outputs discarded).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from mistral.errors import MistralError

KeyLayout = Literal["cache", "cache+new", "new"]
Window = int | None  # a layer's attention window in tokens; None attends to the whole sequence


@dataclass(frozen=True)
class StepPlan:
    """What one forward step needs to know; B rows, T = longest new length, S = buffer size."""

    positions: np.ndarray  # (B, T) int64, absolute position of every new token (0 on padding)
    valid: np.ndarray  # (B, T) bool, False on padding
    store_rows: np.ndarray  # (M,) int64, row b of each new token that is written
    store_cols: np.ndarray  # (M,) int64, its index t among the row's new tokens
    store_slots: np.ndarray  # (M,) int64, the slot (position % S) it is written to
    key_layout: KeyLayout  # what attention reads: see the module docstring
    mask: np.ndarray  # (B, T, K) bool; K = S, S + T or T for "cache", "cache+new", "new"
    key_positions: np.ndarray  # (B, K) int64, absolute position of every key, -1 if empty
    lengths: np.ndarray  # (B,) int64, tokens seen per row before this step (RoPE offsets)

    @property
    def last_index(self) -> np.ndarray:
        """(B,) int64, the index of each row's last new token (0 for a row fed nothing)."""
        return np.maximum(self.valid.sum(1) - 1, 0)


def visibility(q_pos: np.ndarray, k_pos: np.ndarray, window: int | None) -> np.ndarray:
    """The one rule: (B, T) query positions, (B, K) key positions (-1 = empty) -> (B, T, K) bool."""
    q = q_pos[:, :, None]
    k = k_pos[:, None, :]
    mask = (k >= 0) & (k <= q)
    if window is not None:
        mask &= q - k < window
    return mask


def cache_size(window: int | None, longest: int) -> int:
    """The rotating buffer holds the sliding window, or the whole run when that is shorter (or
    there is no window): decode then reads only slots that can hold a token."""
    return longest if window is None else min(window, longest)


class CacheBook:
    """The slot bookkeeping of a batch of rotating buffers; ``step`` plans one forward and advances.

    Example: ``book = CacheBook(batch=2, size=4, window=4); plan = book.step([3, 1])``.
    """

    def __init__(self, batch: int, size: int, window: int | None) -> None:
        if size <= 0 or batch <= 0:
            raise MistralError(f"cache needs batch > 0 and size > 0, got {batch} and {size}")
        self.size = size
        self.window = window
        # A buffer shorter than the window (a short run) must never wrap: it holds everything.
        self.holds_all = window is None or size < window
        self.slot_pos = np.full((batch, size), -1, dtype=np.int64)  # (B, S)
        self.lengths = np.zeros(batch, dtype=np.int64)  # (B,)

    @property
    def batch(self) -> int:
        return len(self.lengths)

    def step(self, seqlens: list[int] | np.ndarray) -> StepPlan:
        """Plans feeding ``seqlens[b]`` new tokens to row b (0 leaves it alone) and records them."""
        seqlens = np.asarray(seqlens, dtype=np.int64)
        B, S = self.batch, self.size
        if seqlens.shape != (B,) or (seqlens < 0).any() or seqlens.sum() == 0:
            raise MistralError(f"seqlens must be {B} non-negative counts, not all 0: {seqlens}")
        if self.holds_all and (self.lengths + seqlens > S).any():
            raise MistralError(
                f"sequence of {int((self.lengths + seqlens).max())} tokens exceeds the cache of {S}"
            )
        T = int(seqlens.max())
        t = np.arange(T)
        valid = t[None, :] < seqlens[:, None]  # (B, T)
        positions = np.where(valid, self.lengths[:, None] + t[None, :], 0)  # (B, T)

        # Only the newest `S` tokens of a row are written: older ones would be overwritten at once.
        stored = valid & (t[None, :] >= seqlens[:, None] - S)  # (B, T)
        rows, cols = np.nonzero(stored)
        slots = positions[rows, cols] % S

        new_slot_pos = self.slot_pos.copy()
        new_slot_pos[rows, slots] = positions[rows, cols]
        new_pos = np.where(valid, positions, -1)  # (B, T), -1 marks padding keys

        layout = self._layout(seqlens, rows, slots)
        key_positions = {
            "cache": new_slot_pos,
            "cache+new": np.concatenate([self.slot_pos, new_pos], axis=1),
            "new": new_pos,
        }[layout]
        mask = visibility(positions, key_positions, self.window)
        mask |= ~valid[:, :, None]  # padding queries see everything, so no row of the mask is empty

        plan = StepPlan(
            positions=positions,
            valid=valid,
            store_rows=rows,
            store_cols=cols,
            store_slots=slots,
            key_layout=layout,
            mask=mask,
            key_positions=key_positions,
            lengths=self.lengths.copy(),
        )
        self.slot_pos = new_slot_pos
        self.lengths = self.lengths + seqlens
        return plan

    def rewind(self, lengths: list[int]) -> bool:
        """Forgets every token at or past ``lengths[b]``; False if the buffer no longer holds
        what later queries would need (then nothing changes and the caller starts over)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if lengths.shape != (self.batch,) or (lengths > self.lengths).any() or (lengths < 0).any():
            raise MistralError(f"cannot rewind {self.lengths} to {lengths}")
        keep = (self.slot_pos >= 0) & (self.slot_pos < lengths[:, None])  # (B, S)
        for b in range(self.batch):
            # The next query, at position lengths[b], sees the window ending there.
            first = 0 if self.holds_all else max(0, lengths[b] - self.window + 1)
            needed = np.arange(first, lengths[b])
            if not np.isin(needed, self.slot_pos[b][keep[b]]).all():
                return False
        self.slot_pos = np.where(keep, self.slot_pos, -1)
        self.lengths = lengths
        return True

    def _layout(self, seqlens: np.ndarray, rows: np.ndarray, slots: np.ndarray) -> KeyLayout:
        if (self.slot_pos < 0).all():
            return "new"  # nothing cached in any row: attend over the new tokens alone
        if (seqlens > self.size).any():
            return "cache+new"  # some new tokens are never stored but later queries need them
        if self.window is not None:
            # Writing first is safe iff no evicted position is still visible to a query of its row;
            # the first new query of a row is the one that looks furthest back.
            evicted = self.slot_pos[rows, slots]
            first_q = self.lengths[rows]
            if ((evicted >= 0) & (first_q - evicted < self.window)).any():
                return "cache+new"
        return "cache"


class Planner:
    """The bookkeeping of one batch for all the layers of a model: one CacheBook per distinct
    attention window among the layers (one today; models that interleave sliding and full layers
    have two), all fed the same tokens, so ``step`` gives one StepPlan per window.

    ``context`` is the longest a row will get: a windowed buffer holds min(window, context) slots
    and rotates, a full one holds ``context``."""

    def __init__(self, batch: int, context: int, windows: Iterable[Window]) -> None:
        self.books = {
            w: CacheBook(batch, cache_size(w, context), w) for w in dict.fromkeys(windows)
        }

    @property
    def sizes(self) -> dict[Window, int]:
        """Slots per row of each window's buffers, what a backend's caches are made with."""
        return {w: book.size for w, book in self.books.items()}

    @property
    def lengths(self) -> np.ndarray:
        """(B,) tokens seen per row (the same in every book)."""
        return next(iter(self.books.values())).lengths

    def step(self, seqlens: list[int] | np.ndarray) -> dict[Window, StepPlan]:
        """CacheBook.step for every window, or for none (the error of the one that refuses)."""
        saved = self.state()
        try:
            return {w: book.step(seqlens) for w, book in self.books.items()}
        except MistralError:
            self.restore(saved)
            raise

    def rewind(self, lengths: list[int]) -> bool:
        """CacheBook.rewind for every window, or for none (False) if one cannot."""
        saved = self.state()
        if all(book.rewind(lengths) for book in self.books.values()):
            return True
        self.restore(saved)
        return False

    def state(self) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(book.slot_pos, book.lengths) for book in self.books.values()]

    def restore(self, state: list[tuple[np.ndarray, np.ndarray]]) -> None:
        for book, (slot_pos, seen) in zip(self.books.values(), state, strict=True):
            book.slot_pos, book.lengths = slot_pos, seen


def plan_prefill(seqlens: list[int], windows: Iterable[Window]) -> dict[Window, StepPlan]:
    """Rows fed whole into an empty cache, or run without one: each attends over its own tokens."""
    return Planner(len(seqlens), max(seqlens), windows).step(seqlens)
