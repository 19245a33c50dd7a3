"""Next-token choice from one row of logits: greedy, temperature, top-k, top-p, min-p, repetition penalty."""

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
        if not (0.0 <= self.temperature <= 10.0):
            raise ValueError("temperature must be within [0, 10]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError("top_p must be within (0, 1]")
        if not (0.0 <= self.min_p < 1.0):
            raise ValueError("min_p must be within [0, 1)")
        if not (0.0 < self.repetition_penalty <= 10.0):
            raise ValueError("repetition_penalty must be within (0, 10]")


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, seen: np.ndarray | None) -> int:
    logits = logits.astype(np.float32, copy=True)
    if params.repetition_penalty != 1.0 and seen is not None and len(seen):
        ids = np.unique(seen)
        vals = logits[ids]
        logits[ids] = np.where(vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty)
    if params.temperature <= 0.0:
        return int(np.argmax(logits))
    logits /= params.temperature
    if params.top_k and params.top_k < logits.size:
        kth = np.partition(logits, -params.top_k)[-params.top_k]
        logits[logits < kth] = -np.inf
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if params.min_p > 0.0:
        probs[probs < params.min_p * probs.max()] = 0.0
    if params.top_p < 1.0:
        order = np.argsort(-probs)
        cum = np.cumsum(probs[order])
        cut = order[np.searchsorted(cum, params.top_p * cum[-1]) + 1:]
        probs[cut] = 0.0
    probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))
