"""Sampling against an independent computation: transformers' logits processors on the same
logits (the kept set exactly, the probabilities), and seeded draws in a chi-square sense."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mistral.sampling import distribution, sample


def reference(
    logits: np.ndarray, temperature: float, top_p: float, top_k: int = 0, min_p: float = 0.0
) -> np.ndarray:
    """transformers' probabilities after its warpers, in the order its generate chains them:
    temperature, top-k, top-p, min-p; (B, V)."""
    scores = torch.from_numpy(logits.astype(np.float32))
    scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    scores = TopPLogitsWarper(top_p)(None, scores)
    if min_p:
        scores = MinPLogitsWarper(min_p)(None, scores)
    return torch.softmax(scores.double(), dim=-1).numpy()


def chi_square_critical(df: int, z: float = 3.09) -> float:
    """The chi-square value exceeded with probability 0.001 (Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9), (1.6, 0.5), (0.3, 0.95)])
def test_the_kept_set_and_probabilities_match_transformers(temperature, top_p):
    logits = np.random.default_rng(3).normal(0, 3, (8, 300)).astype(np.float32)
    ours, ref = distribution(logits, temperature, top_p), reference(logits, temperature, top_p)
    assert np.array_equal(ours > 0, ref > 0)  # the same tokens kept, row by row
    assert np.allclose(ours, ref, rtol=1e-5, atol=1e-9)
    if top_p < 1:
        assert (ours == 0).any(-1).all()  # the nucleus did cut something


def test_a_prefix_reaching_top_p_exactly_ends_the_nucleus():
    """Probabilities 1/2, 1/4, 1/8, 1/8 (exact in binary) with top_p 3/4: the first two reach
    it, so the nucleus is those two (a <= in the cut would take the third)."""
    logits = np.log(np.array([[0.5, 0.25, 0.125, 0.125]]))
    assert (distribution(logits, 1.0, 0.75) > 0).tolist() == [[True, True, False, False]]
    assert (reference(logits, 1.0, 0.75) > 0).tolist() == [[True, True, False, False]]


@pytest.mark.parametrize("temperature, top_p", [(0.8, 0.9), (1.5, 1.0)])
def test_seeded_draws_follow_the_reference_probabilities(temperature, top_p):
    logits = np.random.default_rng(5).normal(0, 1.5, (1, 12)).astype(np.float32)
    n = 20_000
    draws = sample(np.repeat(logits, n, axis=0), temperature, top_p, np.random.default_rng(0))
    expected = reference(logits, temperature, top_p)[0] * n
    counts = np.bincount(draws, minlength=logits.shape[1])
    assert counts[expected == 0].sum() == 0  # nothing outside the nucleus
    kept = expected > 0
    chi2 = float((((counts - expected) ** 2)[kept] / expected[kept]).sum())
    assert chi2 < chi_square_critical(int(kept.sum()) - 1), chi2


def test_greedy_and_seeds():
    logits = np.random.default_rng(1).normal(size=(4, 50)).astype(np.float32)
    assert np.array_equal(sample(logits, 0.0, 0.5, np.random.default_rng(0)), logits.argmax(-1))
    a = sample(logits, 1.0, 1.0, np.random.default_rng(7))
    assert np.array_equal(a, sample(logits, 1.0, 1.0, np.random.default_rng(7)))


@pytest.mark.parametrize(
    "temperature, top_p, top_k, min_p",
    [(1.0, 1.0, 5, 0.0), (0.7, 0.9, 40, 0.0), (1.2, 1.0, 0, 0.05), (0.8, 0.95, 20, 0.1)],
)
def test_top_k_and_min_p_match_transformers(temperature, top_p, top_k, min_p):
    logits = np.random.default_rng(4).normal(0, 3, (8, 300)).astype(np.float32)
    ours = distribution(logits, temperature, top_p, top_k, min_p)
    ref = reference(logits, temperature, top_p, top_k, min_p)
    assert np.array_equal(ours > 0, ref > 0)
    assert np.allclose(ours, ref, rtol=1e-5, atol=1e-9)
    if top_k:
        assert ((ours > 0).sum(-1) <= top_k).all()
    if min_p:
        assert (ours == 0).any(-1).all()


def test_top_k_keeps_ties_with_the_kth_and_min_p_is_relative_to_the_best():
    logits = np.log(np.array([[0.4, 0.2, 0.2, 0.1, 0.1]]))
    assert (distribution(logits, 1.0, 1.0, top_k=2) > 0).tolist() == [[1, 1, 1, 0, 0]]
    assert (reference(logits, 1.0, 1.0, top_k=2) > 0).tolist() == [[1, 1, 1, 0, 0]]
    assert (distribution(logits, 1.0, 1.0, min_p=0.5) > 0).tolist() == [[1, 1, 1, 0, 0]]
    assert (reference(logits, 1.0, 1.0, min_p=0.5) > 0).tolist() == [[1, 1, 1, 0, 0]]


def test_seeded_draws_with_top_k_and_min_p_follow_the_reference():
    logits = np.random.default_rng(6).normal(0, 1.5, (1, 12)).astype(np.float32)
    n = 20_000
    rng = np.random.default_rng(1)
    draws = sample(np.repeat(logits, n, axis=0), 0.9, 1.0, rng, top_k=6, min_p=0.1)
    expected = reference(logits, 0.9, 1.0, 6, 0.1)[0] * n
    counts = np.bincount(draws, minlength=logits.shape[1])
    assert counts[expected == 0].sum() == 0
    kept = expected > 0
    chi2 = float((((counts - expected) ** 2)[kept] / expected[kept]).sum())
    assert chi2 < chi_square_critical(int(kept.sum()) - 1), chi2


def test_generation_takes_top_k_and_min_p_and_refuses_bad_ones():
    """top_k 1 is greedy whatever the temperature; bad values are named before any work."""
    import mistral
    from mistral.weights import random_weights
    from tests.helpers import tiny

    args = tiny("tiny-dense")
    model = mistral.from_tensors(args, random_weights(args), "torch", "cpu")
    prompt = [[1, 5, 9]]
    greedy = model.generate(prompt, 8)
    assert model.generate(prompt, 8, temperature=5.0, seed=3, top_k=1) == greedy
    assert model.generate(prompt, 8, temperature=5.0, seed=3, min_p=0.999) == greedy
    for bad in ({"top_k": -1}, {"top_k": 2.5}, {"min_p": 1.0}, {"min_p": float("nan")}):
        with pytest.raises(mistral.MistralError, match=next(iter(bad))):
            model.generate(prompt, 4, **bad)


def test_mlx_lm_cuts_the_nucleus_before_its_temperature():
    """mlx-lm's sampler applies top-p to the log-probabilities as they are and divides by the
    temperature only when it draws: at temperature 1 its nucleus is ours, at another it is not
    (the README says so)."""
    import mlx.core as mx
    from mlx_lm.sample_utils import apply_top_p

    logits = np.random.default_rng(8).normal(0, 2, (1, 200)).astype(np.float32)
    logprobs = logits - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    theirs = np.isfinite(np.array(apply_top_p(mx.array(logprobs.astype(np.float32)), 0.9)))
    assert np.array_equal(theirs, distribution(logits, 1.0, 0.9) > 0)
    assert (distribution(logits, 2.0, 0.9) > 0).sum() > theirs.sum()  # ours widens with T
