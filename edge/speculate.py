"""Speculative decoding: guess the next few tokens cheaply, check them in one pass of the model.

A decode step reads every weight to produce one token; a pass over 1 + k tokens reads them once for all k + 1
(the graph returns logits for its last `logits_count` positions). When the answer copies from its input (extract
to JSON, rewrite, summarise, edit code, answer from a context), the tokens that followed the last few tokens
earlier in the prompt or the answer are often the next ones: that is the draft (Saxena's prompt lookup decoding,
llama.cpp's `llama-lookup`). The model's own choice at each drafted position decides (sampling.choose); the first
position where it differs ends the step, and the cache positions past it are simply written over by the next pass.

A draft model (`--draft MODEL`, `ModelDrafter`) guesses too: a smaller exported model with the same tokenizer
decodes its own greedy continuation, which helps open-ended text. Its guesses depend on nothing but the text so far
(q is a point mass), so the same check keeps the big model's distribution exactly. With one, a lookup that matches
the last 3 tokens still drafts first, for free; the draft model drafts the rest (`Drafts`).

The draft length adapts: it grows while drafts are taken whole and shrinks when they are refused, so text with
nothing to copy (a story) pays for short drafts only, and no draft at all when the context has no match.
"""

from __future__ import annotations

import time

import numpy as np

NGRAMS = (3, 2, 1)  # the longest match of the last 3, 2 or 1 tokens wins


def match_start(history: np.ndarray, size: int) -> int | None:
    """Where the tokens that followed the latest earlier occurrence of the history's last `size` tokens begin;
    None when they occur nowhere earlier."""
    if len(history) <= size:
        return None
    windows = np.lib.stride_tricks.sliding_window_view(history[:-1], size)  # every earlier n-gram, ending before
    hits = np.flatnonzero((windows == history[-size:]).all(axis=1))
    return int(hits[-1]) + size if len(hits) else None  # the latest occurrence: the text's current phrasing


def lookup_draft(history: list[int] | np.ndarray, n: int, sizes: tuple[int, ...] = NGRAMS) -> list[int]:
    """Up to n tokens that followed the latest earlier occurrence of the history's last 3 (else 2, else 1)
    tokens; [] when there is none."""
    h = np.asarray(history, dtype=np.int64)
    if n < 1 or len(h) < 2:
        return []
    for size in sizes:
        start = match_start(h, size)
        if start is not None:
            return h[start:start + n].tolist()
    return []


class ModelDrafter:
    """Drafts from a second model: its greedy continuation of the text so far.

    `gen` is the draft model's Generator, used for nothing else. Its cache follows the text: a draft is fed only the
    tokens its cache does not hold (the big model's correction, or the last drafted token and the bonus one), so a
    draft of n tokens costs about n of its decode steps."""

    def __init__(self, gen, eos: set[int], vocab: int):
        self.gen, self.eos, self.vocab = gen, eos, vocab  # vocab: the big model's (a padded one may differ)
        self.name = gen.manifest.name

    def prime(self, prompt: list[int]) -> None:
        """Feed the prompt to the draft model with the big model's prompt (as llama-speculative does), so that
        the first draft costs only its own steps."""
        if len(prompt) < self.gen.model.max_length:
            self.gen.prompt_logits(prompt)

    def __call__(self, history: list[int], n: int) -> list[int]:
        n = min(n, self.gen.model.max_length - len(history))  # past its context: no draft, plain steps
        if n < 1:
            return []
        logits, _ = self.gen.prompt_logits(history)
        out: list[int] = []
        while True:
            token = int(np.argmax(logits[:self.vocab]))
            out.append(token)
            if len(out) == n or token in self.eos:
                return out
            logits = self.gen.decode_one_token(token, len(history) + len(out) - 1)


class PassCost:
    """What a pass of the model costs, learnt from the passes' own timings: seconds of a one-token pass, and of
    each further token in a pass; beta, their ratio (what one drafted row adds, in single steps). The same for
    every draft source: the check costs the same whoever drafted."""

    def __init__(self, beta: float = 0.15):
        self.beta = beta
        self.step_s = self.extra_s = 0.0

    def timed(self, rows: int, seconds: float) -> None:
        """A pass of `rows` tokens took `seconds`."""
        if rows == 1:
            self.step_s = seconds if not self.step_s else 0.9 * self.step_s + 0.1 * seconds
        elif self.step_s:
            extra = max(0.0, seconds - self.step_s) / (rows - 1)
            self.extra_s = extra if not self.extra_s else 0.9 * self.extra_s + 0.1 * extra
        if self.step_s and self.extra_s:
            self.beta = self.extra_s / self.step_s


class DraftLength:
    """How many tokens one draft source should draft next: the k that maximizes the expected tokens per pass over
    the pass's cost.

    With a per-token acceptance rate a, a draft of k gives (1 - a^(k+1)) / (1 - a) tokens for a pass that costs
    1 + (beta + gamma)*k single steps: beta for each drafted row the check adds (PassCost), gamma for making each
    drafted token (0 for a lookup; a draft model's step, relative to the big model's, `drafting`). a is learnt from
    this source's drafts (an average that forgets). Text the drafts miss drives a down until drafting stops (k = 0);
    while it does not draft, a drifts back towards its prior, so a later passage that drafts well is found again."""

    PRIOR = 0.5
    FORGET = 0.8  # weight of the past in the acceptance average, per draft
    RELAX = 0.97  # per pass without a draft: how slowly the past fades towards the prior

    def __init__(self, most: int, cost: PassCost | None = None):
        self.most = most
        self.cost = cost or PassCost()
        self.hits, self.trials = self.PRIOR * 2, 2.0  # the prior, worth two tokens
        self.draft_s = 0.0  # seconds to make one drafted token

    @property
    def rate(self) -> float:
        return self.hits / self.trials

    @property
    def gamma(self) -> float:
        return self.draft_s / self.cost.step_s if self.cost.step_s else 0.0

    @property
    def now(self) -> int:
        a = min(self.rate, 0.99)
        cost = self.cost.beta + self.gamma
        gain = [(1 - a ** (k + 1)) / (1 - a) / (1 + cost * k) for k in range(self.most + 1)]
        return int(np.argmax(gain))

    def update(self, drafted: int, accepted: int) -> None:
        if not drafted:
            self.hits = self.PRIOR * 2 + (self.hits - self.PRIOR * 2) * self.RELAX
            self.trials = 2.0 + (self.trials - 2.0) * self.RELAX
            return
        # the tokens taken, and the one refused if any: a geometric count of trials
        self.hits = self.hits * self.FORGET + accepted
        self.trials = self.trials * self.FORGET + accepted + (accepted < drafted)

    def drafting(self, tokens: int, seconds: float) -> None:
        """Making a draft of `tokens` took `seconds` (a draft model's steps): refine gamma."""
        if tokens:
            each = seconds / tokens
            self.draft_s = each if not self.draft_s else 0.9 * self.draft_s + 0.1 * each


class Drafts:
    """Where each pass's draft comes from, and how long it is.

    Lookup drafts by the longest match of the last 3, 2 or 1 tokens; each match length learns its own acceptance,
    because a match of 3 tokens predicts far better than a match of 1 (SmolLM2's grounded tasks: one acceptance
    for all lengths let the 1-token matches shorten every draft). A length whose drafts are refused stops drafting
    and leaves the turn to the next shorter one. With a draft model: a lookup that matches the last 3 tokens first
    (copying costs nothing to draft), else the draft model, with its own acceptance too."""

    STRONG = (3,)  # with a draft model, only a 3-token match is worth a lookup draft

    def __init__(self, most: int, model: ModelDrafter | None = None):
        self.model = model
        self.cost = PassCost()
        self.by_match = {size: DraftLength(most, self.cost) for size in (self.STRONG if model else NGRAMS)}
        self.by_model = DraftLength(most, self.cost) if model else None
        self.last: DraftLength | None = None  # the source of the draft in flight

    def next(self, history: list[int], room: int) -> list[int]:
        """The draft for the next pass: at most `room` tokens (what the answer and the context have left)."""
        self.last = None
        h = np.asarray(history, dtype=np.int64)
        for size, length in self.by_match.items():
            start = match_start(h, size)
            if start is None:
                continue
            k = min(length.now, room)
            if k < 1:
                length.update(0, 0)  # not drafted: its acceptance drifts back towards the prior
                continue
            self.last = length
            return h[start:start + k].tolist()
        if not self.model:
            return []
        k = min(self.by_model.now, room)
        if k < 1:
            self.by_model.update(0, 0)
            return []
        self.last = self.by_model
        began = time.perf_counter()
        draft = self.model(history, k)
        self.by_model.drafting(len(draft), time.perf_counter() - began)
        return draft

    def update(self, drafted: int, accepted: int) -> None:
        if self.last is not None:
            self.last.update(drafted, accepted)

    def timed(self, rows: int, seconds: float) -> None:
        self.cost.timed(rows, seconds)
