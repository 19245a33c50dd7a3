"""The sampler: which tokens each filter keeps, with what probability, and draws that follow them."""

from __future__ import annotations

import numpy as np
import pytest
from nomoat.edge.sampling import SamplingParams, distribution, sample

VOCAB = 49152  # SmolLM2's: large enough for the blockwise draw


def reference(logits: np.ndarray, p: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """The filters written plainly: float64, the whole vocabulary sorted."""
    z = logits.astype(np.float64) / p.temperature
    if p.top_k and p.top_k < z.size:
        z[z < np.sort(z)[-p.top_k]] = -np.inf
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    if p.min_p > 0.0:
        probs[probs < p.min_p * probs.max()] = 0.0
    if p.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cum = np.cumsum(probs[order])
        probs[order[np.searchsorted(cum, p.top_p * cum[-1]) + 1:]] = 0.0
    ids = np.flatnonzero(probs)
    return ids, probs[ids] / probs[ids].sum()


def likely(ids: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted by id, without the tokens below 1e-30 (the sampler's float32 weights underflow around 1e-45)."""
    order = np.argsort(ids)
    ids, probs = ids[order], probs[order]
    return ids[probs > 1e-30], probs[probs > 1e-30]


def logits_like_a_model(seed: int, spread: float) -> np.ndarray:
    """A few strong candidates over a long tail; `spread` scales the tail (large: a flat distribution)."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(VOCAB).astype(np.float32) * spread
    z[rng.choice(VOCAB, 8, replace=False)] += rng.uniform(4, 12, 8).astype(np.float32)
    return z


PARAMS = [SamplingParams(temperature=0.7), SamplingParams(temperature=0.7, top_p=0.95),
          SamplingParams(temperature=1.0, top_k=40), SamplingParams(temperature=0.8, min_p=0.05),
          SamplingParams(temperature=0.7, top_k=40, top_p=0.95, min_p=0.05),
          SamplingParams(temperature=1.5, top_p=0.5), SamplingParams(temperature=2.0, top_k=5000, top_p=0.99)]


@pytest.mark.parametrize("spread", [1.0, 3.0, 8.0])  # 8: flat enough that no threshold holds the share
@pytest.mark.parametrize("params", PARAMS, ids=str)
def test_the_filters_keep_what_the_plain_version_keeps(params, spread):
    for seed in range(3):
        logits = logits_like_a_model(seed, spread)
        ids, probs = likely(*distribution(logits, params))
        ref_ids, ref_probs = likely(*reference(logits, params))
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_allclose(probs, ref_probs, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("vocab", [10, VOCAB])  # one cumulative sum; blocks of 1024 first
def test_draws_follow_the_distribution(vocab):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(vocab).astype(np.float32) * 2
    logits[[3, vocab - 1]] += 6  # the last token too: the draw's final block
    params = SamplingParams(temperature=1.0)
    ids, probs = distribution(logits, params)
    n = 20000
    counts = np.bincount([sample(logits, params, rng, None) for _ in range(n)], minlength=vocab)
    likely = ids[probs > 0.01]
    expected = probs[probs > 0.01] * n
    assert np.all(np.abs(counts[likely] - expected) < 5 * np.sqrt(expected) + 1)
    assert counts.sum() == n and counts[np.setdiff1d(np.arange(vocab), ids)].sum() == 0


def test_greedy_and_the_repetition_penalty():
    logits = np.array([1.0, 3.0, 2.0, -1.0], np.float32)
    rng = np.random.default_rng(0)
    assert sample(logits, SamplingParams(), rng, None) == 1
    # token 1 seen: 3 / 2 = 1.5 < 2; a negative logit is multiplied, so it falls further
    assert sample(logits, SamplingParams(repetition_penalty=2.0), rng, np.array([1, 1, 3])) == 2
    assert logits[1] == 3.0  # the caller's logits are left alone


@pytest.mark.parametrize("params, draft", [
    (SamplingParams(temperature=1.0), 3),  # the most probable token drafted
    (SamplingParams(temperature=0.8, top_k=5), 7),  # a token the filters may drop
    (SamplingParams(temperature=1.0, top_p=0.9), 0),
])
def test_choosing_a_drafted_token_keeps_the_distribution(params, draft):
    """Speculative sampling of a deterministic draft: taken with probability p(draft), else a draw without it;
    each token must still come out with its probability p (Leviathan et al.). 20000 draws within 5 sigma."""
    from nomoat.edge.sampling import choose

    rng = np.random.default_rng(1)
    logits = rng.standard_normal(12).astype(np.float32) * 1.5
    logits[3] += 2
    ids, probs = distribution(logits, params)
    n = 20000
    draws = [choose(logits, params, rng, None, draft) for _ in range(n)]
    counts = np.bincount([t for t, _ in draws], minlength=12)
    expected = np.zeros(12)
    expected[ids] = probs * n
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected) + 1)
    taken = sum(ok for _, ok in draws)
    assert taken == counts[draft] and all(ok == (t == draft) for t, ok in draws)


def test_choosing_greedily_takes_the_draft_only_when_it_is_the_best():
    from nomoat.edge.sampling import choose

    logits = np.array([1.0, 3.0, 2.0], np.float32)
    rng = np.random.default_rng(0)
    assert choose(logits, SamplingParams(), rng, None, 1) == (1, True)
    assert choose(logits, SamplingParams(), rng, None, 2) == (1, False)
    assert choose(logits, SamplingParams(), rng, None, None) == (1, False)
