"""The shared bookkeeping alone, against a brute-force O(T^2) construction of who sees whom."""

import numpy as np
import pytest

from mistral.cache import CacheBook, visibility
from mistral.errors import MistralError


def brute_force_visible(q: int, seen: int, window: int | None) -> set[int]:
    """Every position a query at q may attend to, from first principles."""
    return {p for p in range(seen) if p <= q and (window is None or q - p < window)}


class Emulated:
    """A fake backend: its buffer stores each token's own position, so reads can be checked."""

    def __init__(self, batch: int, size: int) -> None:
        self.buf = np.full((batch, size), -1)

    def step(self, plan) -> np.ndarray:
        """Reads keys where the plan says, stores where it says; returns key positions it read."""
        new = np.where(plan.valid, plan.positions, -1)
        if plan.key_layout == "new":
            keys = new
        elif plan.key_layout == "cache+new":
            keys = np.concatenate([self.buf, new], axis=1)
        self.buf[plan.store_rows, plan.store_slots] = plan.positions[
            plan.store_rows, plan.store_cols
        ]
        if plan.key_layout == "cache":
            keys = self.buf.copy()
        return keys


def check_steps(batch: int, size: int, window: int | None, steps: list[list[int]]) -> set[str]:
    book = CacheBook(batch, size, window)
    fake = Emulated(batch, size)
    seen = np.zeros(batch, dtype=int)
    layouts = set()
    for seqlens in steps:
        plan = book.step(seqlens)
        layouts.add(plan.key_layout)
        keys = fake.step(plan)
        np.testing.assert_array_equal(keys, plan.key_positions)
        for b, n in enumerate(seqlens):
            np.testing.assert_array_equal(plan.positions[b, :n], seen[b] + np.arange(n))
            for t in range(n):
                q = seen[b] + t
                visible = keys[b][plan.mask[b, t]]
                assert sorted(visible) == sorted(brute_force_visible(q, seen[b] + n, window))
                assert len(set(visible)) == len(visible), "a position is read twice"
            assert not plan.valid[b, n:].any()
        seen += np.asarray(seqlens)
        # Each slot holds the newest position that maps to it.
        for b in range(batch):
            for s in range(size):
                held = [p for p in range(seen[b]) if p % size == s]
                assert book.slot_pos[b, s] == (max(held) if held else -1)
    return layouts


def test_worked_example_of_the_docstring():
    book = CacheBook(batch=1, size=4, window=4)
    book.step([6])
    np.testing.assert_array_equal(book.slot_pos, [[4, 5, 2, 3]])
    plan = book.step([3])
    assert plan.key_layout == "cache+new"
    np.testing.assert_array_equal(plan.key_positions, [[4, 5, 2, 3, 6, 7, 8]])
    np.testing.assert_array_equal(
        plan.mask[0].astype(int),
        [[1, 1, 0, 1, 1, 0, 0], [1, 1, 0, 0, 1, 1, 0], [0, 1, 0, 0, 1, 1, 1]],
    )
    np.testing.assert_array_equal(plan.store_slots, [2, 3, 0])
    np.testing.assert_array_equal(book.slot_pos, [[8, 5, 6, 7]])


def test_first_prefill_then_decode():
    assert check_steps(1, 8, 8, [[5]] + [[1]] * 20) == {"new", "cache"}


def test_prefill_longer_than_the_window():
    assert "new" in check_steps(1, 4, 4, [[11], [1], [1]])


def test_chunked_prefill_over_a_wrapped_buffer():
    layouts = check_steps(1, 5, 5, [[3], [4], [7], [2], [1], [1], [6]])
    assert "cache+new" in layouts


def test_ragged_batch_with_idle_rows():
    check_steps(3, 6, 6, [[9, 2, 4], [1, 0, 3], [0, 5, 1], [1, 1, 1], [2, 7, 0]])


def test_no_window_buffer_holds_everything():
    assert check_steps(2, 30, None, [[10, 4], [3, 9], [1, 1], [1, 1]]) == {"new", "cache"}


def test_buffer_wrapped_many_times():
    rng = np.random.default_rng(0)
    steps = [[1, 1]] * 40 + [rng.integers(0, 5, 2).tolist() for _ in range(30)] + [[1, 1]] * 10
    steps = [s for s in steps if sum(s)]
    check_steps(2, 4, 3, steps)


def test_buffer_larger_than_the_window():
    check_steps(2, 6, 3, [[7, 2], [1, 4], [3, 3], [1, 1]])


def test_random_schedules():
    rng = np.random.default_rng(1)
    for _ in range(20):
        batch, window = int(rng.integers(1, 4)), int(rng.integers(1, 7))
        size = window + int(rng.integers(0, 3))
        steps = [rng.integers(0, 9, batch).tolist() for _ in range(8)]
        check_steps(batch, size, window, [s for s in steps if sum(s)])


def test_padding_queries_never_have_an_empty_mask_row():
    book = CacheBook(2, 4, 4)
    plan = book.step([1, 3])
    assert plan.mask.any(-1).all()


def test_visibility_rule():
    q = np.array([[5]])
    k = np.array([[-1, 1, 2, 5, 6]])
    np.testing.assert_array_equal(visibility(q, k, 4)[0, 0], [False, False, True, True, False])
    np.testing.assert_array_equal(visibility(q, k, None)[0, 0], [False, True, True, True, False])


def test_buffer_shorter_than_the_window_holds_the_whole_run():
    check_steps(2, 10, 16, [[6, 3], [1, 4], [3, 1]])
    book = CacheBook(1, 4, 16)
    book.step([4])
    with pytest.raises(MistralError, match="exceeds the cache"):
        book.step([1])


def test_overflow_without_a_window_is_an_error():
    book = CacheBook(1, 4, None)
    book.step([3])
    with pytest.raises(MistralError, match="exceeds the cache"):
        book.step([2])


def test_rewind_within_the_buffer_and_refusal_past_it():
    book = CacheBook(1, 4, 4)
    book.step([3])
    assert book.rewind([1])
    np.testing.assert_array_equal(book.slot_pos, [[0, -1, -1, -1]])
    check = CacheBook(1, 4, 4)
    check.step([1])
    assert (book.step([2]).mask == check.step([2]).mask).all()
    book.step([6])  # positions 3..8: positions 1..4 are overwritten
    assert not book.rewind([3])
    assert book.lengths[0] == 9
    assert book.rewind([8])


def test_planner_steps_every_window_or_none():
    """Books of a sliding and a full layer: a step the full buffer cannot hold changes neither."""
    from mistral.cache import Planner

    planner = Planner(1, 10, [4, None, 4])
    assert planner.sizes == {4: 4, None: 10}
    planner.step([8])
    with pytest.raises(MistralError, match="exceeds the cache"):
        planner.step([5])
    assert [int(b.lengths[0]) for b in planner.books.values()] == [8, 8]
    plans = planner.step([2])
    assert plans[None].positions.tolist() == plans[4].positions.tolist() == [[8, 9]]
    assert not planner.rewind([1]) and int(planner.lengths[0]) == 10  # window 4 lost position 1
