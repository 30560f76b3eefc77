"""Sampling is numerically safe for every value the API accepts.

Oracles: closed-form limits (a vanishing temperature is argmax, softmax sums to one), Meta's arithmetic for
ordinary values (``logits / T`` bit for bit), and finite float32 bounds.
"""

from __future__ import annotations

import math

import pytest
import torch

from llama3.errors import GenerationError
from llama3.sampling import (
    SamplingParams,
    apply_logit_bias,
    apply_penalties,
    choose,
    next_token_probs,
    nucleus,
    sample_top_p,
    scaled_logits,
)

VOCAB = 64


def logits_row(seed: int = 0, scale: float = 20.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, VOCAB, generator=g) * scale).float()


@pytest.mark.parametrize("temperature", [1e-37, 1e-40, 1e-45, 5e-324, 1e-300, torch.finfo(torch.float32).tiny])
def test_vanishing_temperature_is_greedy(temperature):
    logits = logits_row()
    params = SamplingParams(temperature=temperature, top_p=0.9)
    probs = next_token_probs(logits, params)
    assert torch.isfinite(probs).all()
    expected = torch.nn.functional.one_hot(logits.argmax(-1), VOCAB).float()
    assert torch.equal(probs, expected)
    for seed in range(5):
        token = choose(logits, params, torch.Generator().manual_seed(seed))
        assert torch.equal(token, logits.argmax(-1))


def test_ties_at_a_vanishing_temperature_share_the_mass():
    logits = torch.full((1, VOCAB), -5.0)
    logits[0, [3, 9]] = 7.0
    probs = next_token_probs(logits, SamplingParams(temperature=1e-40, top_p=1.0))
    assert probs[0, 3] == probs[0, 9] == 0.5 and probs.sum() == 1


@pytest.mark.parametrize("temperature", [0.05, 0.6, 1.0, 2.0])
def test_ordinary_temperatures_keep_metas_arithmetic(temperature):
    logits = logits_row(1)
    assert torch.equal(scaled_logits(logits, temperature), logits / temperature)


def test_huge_temperature_is_uniform_not_nan():
    logits = logits_row(2)
    logits[0, 5] = -math.inf  # a forbidden token stays forbidden
    probs = next_token_probs(logits, SamplingParams(temperature=1e300, top_p=1.0))
    assert torch.isfinite(probs).all() and probs[0, 5] == 0
    assert torch.allclose(probs[1], torch.full((VOCAB,), 1 / VOCAB))


@pytest.mark.parametrize("penalty", [1e-300, 1e-40, 1e-12, 1e12, 1e40, 1e300])
def test_extreme_repetition_penalties_stay_finite(penalty):
    logits = logits_row(3)
    logits[:, 0] = 0.0  # 0 * a penalty that overflows to inf must not become NaN
    counts = torch.zeros(2, VOCAB, dtype=torch.int32)
    counts[:, :10] = 1
    params = SamplingParams(temperature=1.0, repetition_penalty=penalty)
    out = apply_penalties(logits, params, None, counts)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:, 10:], logits[:, 10:])  # unseen tokens untouched
    probs = next_token_probs(out, params)
    assert torch.isfinite(probs).all() and torch.allclose(probs.sum(-1), torch.ones(2))
    if penalty < 1:  # seen tokens with positive logits become overwhelmingly likely (saturating at float32's max)
        picked = choose(out, SamplingParams(temperature=0))
        assert all(t < 10 and logits[i, t] > 0 for i, t in enumerate(picked.tolist()))
    choose(out, params, torch.Generator().manual_seed(0))


def test_logit_bias_beyond_float32_range():
    logits = logits_row(4)
    biased = apply_logit_bias(logits, {7: 1e300, 8: -1e300})  # +inf and -inf in float32
    params = SamplingParams(temperature=1.0, top_p=1.0)
    probs = next_token_probs(biased.clamp(max=torch.finfo(torch.float32).max), params)
    assert torch.equal(choose(biased, params, torch.Generator().manual_seed(0)), torch.tensor([7, 7]))
    assert torch.isfinite(probs).all() and (probs[:, 8] == 0).all()


def test_nothing_to_choose_is_a_generation_error():
    forbidden = torch.full((1, VOCAB), -math.inf)
    for params in (SamplingParams(temperature=0), SamplingParams(temperature=0.7)):
        with pytest.raises(GenerationError, match="forbids every token"):
            choose(forbidden, params)
        nan = logits_row(5)
        nan[1, 3] = math.nan
        with pytest.raises(GenerationError, match="NaN"):
            choose(nan, params)


def meta_survivors(probs: torch.Tensor, p: float) -> set[int]:
    """Meta's ``sample_top_p`` mask, literally: full descending sort, drop once the mass before exceeds p."""
    probs_sort, probs_idx = torch.sort(probs, descending=True, stable=True)
    mask = torch.cumsum(probs_sort, dim=-1) - probs_sort > p
    return {int(i) for i in probs_idx[~mask]}


@pytest.mark.parametrize("vocab", [5, 64, 4096, 49152])
def test_nucleus_keeps_metas_survivors(vocab):
    # Peaked and flat rows, so the head search stops at the first k, grows, or falls back to the whole row;
    # with ties, the ids kept at the cut are a stable sort's (the lowest).
    g = torch.Generator().manual_seed(vocab)
    for trial in range(16):
        scale = [0.05, 1.0, 4.0, 12.0][trial % 4]
        logits = torch.randn(vocab, generator=g) * scale
        if trial >= 8:  # whole-number logits: many exact ties, some cut at the boundary
            logits = logits.round()
        probs = torch.softmax(logits, dim=-1)
        for p in (0.05, 0.5, 0.9, 0.999):
            values, ids = nucleus(probs, p)
            assert {int(i) for i in ids} == meta_survivors(probs, p), (trial, p)
            assert torch.equal(values, probs[ids]) and bool((values[:-1] >= values[1:]).all())


def test_top_p_draws_follow_the_renormalised_nucleus():
    # Closed form: with p = 0.8 the survivors are tokens 0..3 (mass before token 4 is 0.85 > 0.8), drawn in
    # proportion to their renormalised mass; tokens of probability 0 are never drawn.
    probs = torch.tensor([[0.4, 0.25, 0.12, 0.08, 0.1, 0.05, 0.0, 0.0]])
    probs = probs / probs.sum()
    order = [0, 1, 2, 4, 3, 5]  # by probability
    g = torch.Generator().manual_seed(0)
    draws = 20000
    counts = torch.zeros(8)
    for _ in range(draws):
        counts[int(sample_top_p(probs, 0.8, g))] += 1
    survivors = order[:4]
    expected = torch.zeros(8)
    expected[survivors] = probs[0, survivors] / probs[0, survivors].sum()
    assert set(torch.nonzero(counts).flatten().tolist()) == set(survivors)
    # Within 5 binomial standard deviations of the closed form.
    sd = (expected * (1 - expected) / draws).sqrt()
    assert bool(((counts / draws - expected).abs() <= 5 * sd + 1e-9).all()), counts / draws
    # p = 1 keeps every token with mass, and only those.
    counts = torch.zeros(8)
    for _ in range(4000):
        counts[int(sample_top_p(probs, 1.0, g))] += 1
    assert set(torch.nonzero(counts).flatten().tolist()) == {0, 1, 2, 3, 4, 5}
