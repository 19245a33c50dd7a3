"""Next-token choice from one row of logits: greedy, temperature, top-k, top-p, min-p, repetition penalty.

`distribution` says which tokens may come next and with what probability; `sample` draws one of them. The
filters apply in llama.cpp's usual order: repetition penalty, temperature, top-k, min-p (against the most
probable token), top-p (the smallest set of most probable tokens holding that share of what is left).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def validate(self) -> None:
        # a tiny temperature is 0 in float32 (1e-300): logits / 0 would draw garbage
        if not (self.temperature == 0.0 or 1e-3 <= self.temperature <= 10.0):
            raise ValueError("temperature must be 0 (greedy) or within [0.001, 10]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError("top_p must be within (0, 1]")
        if not (0.0 <= self.min_p < 1.0):
            raise ValueError("min_p must be within [0, 1)")
        if not (0.0 < self.repetition_penalty <= 10.0):
            raise ValueError("repetition_penalty must be within (0, 10]")


def penalized(logits: np.ndarray, params: SamplingParams, seen: np.ndarray | None) -> np.ndarray:
    """A float32 copy of the logits with the tokens already seen made less likely (CTRL's penalty)."""
    logits = logits.astype(np.float32, copy=True)
    if params.repetition_penalty != 1.0 and seen is not None and len(seen):
        ids = np.unique(seen)
        vals = logits[ids]
        logits[ids] = np.where(vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty)
    return logits


def distribution(logits: np.ndarray, params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, their probabilities summing to 1) that sampling at params.temperature > 0 chooses from."""
    ids, w = _kept(logits.astype(np.float32, copy=True), params)
    if ids is None:
        ids = np.arange(w.size)
    possible = w > 0  # (float32 weights of tokens far below the best underflow to 0: never drawn)
    return ids[possible], w[possible].astype(np.float64) / w.sum(dtype=np.float64)


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, seen: np.ndarray | None) -> int:
    z = penalized(logits, params, seen)  # a copy, which the filters then work on in place
    if params.temperature <= 0.0:
        return int(np.argmax(z))
    ids, w = _kept(z, params)
    i = _draw(w, rng.random())
    return i if ids is None else int(ids[i])


def choose(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, seen: np.ndarray | None,
           draft: int | None) -> tuple[int, bool]:
    """The next token where a draft proposed `draft`, and whether it is the draft (speculative sampling).

    Greedy: the most probable token, accepted when it is the draft. Sampling: the draft is taken with probability
    p(draft), else a token is drawn from p without the draft (renormalized). The drafts here are deterministic
    (q(draft) = 1), and for that Leviathan et al.'s rule min(1, p/q), with max(0, p - q) on refusal, is exactly
    this: every token comes out with probability p, as plain sampling gives."""
    if draft is None:
        return sample(logits, params, rng, seen), False
    z = penalized(logits, params, seen)
    if params.temperature <= 0.0:
        token = int(np.argmax(z))
        return token, token == draft
    ids, w = _kept(z, params)
    at = np.flatnonzero(ids == draft) if ids is not None else np.array([draft])
    total = float(w.sum(dtype=np.float64))
    if len(at) and rng.random() * total < float(w[at[0]]):
        return draft, True
    if len(at):
        w[at[0]] = 0.0  # (w is ours: penalized made a copy, and ids picked one)
    if not w.any():  # the draft was the only token possible (its probability 1): unreachable refusal
        return draft, True
    i = _draw(w, rng.random())
    return (i if ids is None else int(ids[i])), False


def _kept(z: np.ndarray, params: SamplingParams) -> tuple[np.ndarray | None, np.ndarray]:
    """The ids the filters keep (None: every token) and their unnormalized probabilities; `z` (float32 logits)
    becomes the weights.

    In place, and only the most probable tokens are ever sorted (`_most_probable`): with temporary arrays and a
    whole-vocabulary sort for top-p, SmolLM2 spent 0.9-2.7 ms a token here, against ~11 for the model step."""
    z /= np.float32(params.temperature)
    z -= z.max()
    w = np.exp(z, out=z)  # the most probable token's weight is 1
    ids = None
    if params.top_k and params.top_k < w.size:
        ids = _most_probable(w, lambda c: len(c) >= params.top_k)
        ids = ids[np.argpartition(w[ids], -params.top_k)[-params.top_k:]]
    if params.min_p > 0.0:  # relative to the most probable token, whose weight is 1
        ids = np.flatnonzero(w >= params.min_p) if ids is None else ids[w[ids] >= params.min_p]
    if params.top_p < 1.0:
        need = params.top_p * float(w.sum(dtype=np.float64) if ids is None else w[ids].sum(dtype=np.float64))
        if ids is None:
            ids = _most_probable(w, lambda c: w[c].sum(dtype=np.float64) >= need)
        ids = ids[np.argsort(-w[ids], kind="stable")]
        cum = np.cumsum(w[ids], dtype=np.float64)
        ids = ids[: min(int(np.searchsorted(cum, need)), len(ids) - 1) + 1]  # the smallest set holding the share
    return ids, (w if ids is None else w[ids])


def _most_probable(w: np.ndarray, enough) -> np.ndarray:
    """The ids of every token with weight >= t, for the largest t of 1e-3, 1e-6, 1e-9 whose set is `enough`
    (it then holds whatever top-k or top-p keep), else all."""
    for t in (1e-3, 1e-6, 1e-9):
        ids = np.flatnonzero(w >= t)
        if enough(ids):
            return ids
    return np.arange(w.size)


def _draw(w: np.ndarray, u: float) -> int:
    """The index i with probability w[i] / w.sum() for a uniform u in [0, 1): the inverse of the cumulative sum,
    found among sums of 1024-weight blocks first when there are many (numpy's cumsum of 49152 takes ~0.3 ms)."""
    block = 1024
    if w.size <= 4 * block:
        cum = np.cumsum(w, dtype=np.float64)
        return min(int(np.searchsorted(cum, u * cum[-1], side="right")), w.size - 1)
    whole = w.size // block * block
    sums = w[:whole].reshape(-1, block).sum(1)  # (numpy sums pairwise: float32 is exact enough here)
    if whole < w.size:
        sums = np.append(sums, w[whole:].sum())
    sums = np.cumsum(sums, dtype=np.float64)
    target = u * sums[-1]
    b = min(int(np.searchsorted(sums, target, side="right")), len(sums) - 1)
    inner = np.cumsum(w[b * block:(b + 1) * block], dtype=np.float64)
    offset = target - (sums[b - 1] if b else 0.0)
    return b * block + min(int(np.searchsorted(inner, offset, side="right")), len(inner) - 1)
