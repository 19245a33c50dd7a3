#!/usr/bin/env python3
"""How fast prompt lookup could make the task suite at best: the runtime's drafting policy against two clairvoyant
ones, replayed over the model's own plain greedy answers with this machine's measured pass costs.

    .venv/bin/python tools/lookup_ceiling.py models/smollm2-135m

1. Generates each prompt's plain greedy answer (tools/speculative_tasks.json, chat template, 128 tokens at most).
2. Measures what a pass of 1..8 rows costs here (medians over interleaved repetitions).
3. Replays each answer pass by pass and prices every pass at its row count:
   - `policy`: the runtime's own drafts (edge/speculate.py `Drafts`, learning as it goes, as in `generate`);
   - `perfect length`: the same candidate (the latest match of the last 3, 2 or 1 tokens), drafted exactly as far
     as it will be taken, so no row is wasted and no taken token is left out;
   - `best candidate`: every earlier position that follows the last token, the one that will be taken furthest, at
     its perfect length.
   Prints tokens per pass and the speed-up over plain decoding per task type. The clairvoyant rows bound what any
   lookup drafter (single candidate per pass) can reach with this model and these kernels.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from nomoat.edge.bench import experiment_profile
from nomoat.edge.generate import Generator
from nomoat.edge.speculate import NGRAMS, Drafts, match_start

TASKS = Path(__file__).with_name("speculative_tasks.json")
MOST = 7  # the longest draft priced (8 rows)


def row_costs(gen: Generator, reps: int = 30) -> dict[int, float]:
    """Median seconds of a pass of 1..MOST+1 rows, after a 200-token prompt."""
    prompt = [(100 + i * 37) % gen.vocab for i in range(200)]
    gen.prefill(prompt)
    times: dict[int, list[float]] = defaultdict(list)
    for _ in range(reps):
        for rows in range(1, MOST + 2):
            t = time.perf_counter()
            gen._forward(prompt[:rows], 200 + rows, rows=rows)
            times[rows].append(time.perf_counter() - t)
    return {rows: float(np.median(t)) for rows, t in times.items()}


def taken(candidate, future) -> int:
    n = 0
    while n < len(candidate) and n < len(future) and candidate[n] == future[n]:
        n += 1
    return n


def latest_match(h: np.ndarray) -> list[int]:
    for size in NGRAMS:
        start = match_start(h, size)
        if start is not None:
            return h[start:start + MOST].tolist()
    return []


def best_candidate(h: np.ndarray, future: list[int]) -> int:
    starts = np.flatnonzero(h[:-1] == h[-1]) + 1
    return max((taken(h[s:s + MOST].tolist(), future) for s in starts), default=0)


def replay(prompt: list[int], answer: list[int], how: str, cost: dict[int, float]) -> tuple[int, int, float]:
    """(tokens, passes, seconds) of one answer under one drafter."""
    drafts = Drafts(MOST) if how == "policy" else None
    i = passes = 0
    seconds = 0.0
    while i < len(answer):
        history = prompt + answer[:i]
        future = answer[i:i + MOST]
        if drafts:
            draft = drafts.next(history, MOST)
            n = taken(draft, future)
            rows = len(draft) + 1
            drafts.update(len(draft), n)
            drafts.timed(rows, cost[rows])
        else:
            h = np.asarray(history, dtype=np.int64)
            n = taken(latest_match(h), future) if how == "perfect length" else best_candidate(h, future)
            rows = n + 1
        seconds += cost[rows]
        passes += 1
        i += n + 1
    return len(answer), passes, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", default="x86-64-dev")
    ap.add_argument("--max-tokens", type=int, default=128)
    a = ap.parse_args()
    gen = Generator(a.model, experiment_profile(a.profile, a.threads, 2048), verify_files=False)
    tasks = json.loads(TASKS.read_text())["tasks"]
    runs = []
    for t in tasks:
        prompt = gen.encode([{"role": "user", "content": t["prompt"]}])
        answer = gen.generate(prompt, max_tokens=a.max_tokens, draft_tokens=0).tokens
        runs.append((t["type"], prompt, answer))
    cost = row_costs(gen)
    print("pass cost ms by rows: " + ", ".join(f"{r}: {c * 1e3:.2f}" for r, c in cost.items()))
    hows = ("policy", "perfect length", "best candidate")
    kinds = list(dict.fromkeys(k for k, _, _ in runs)) + ["grounded", "all"]
    print("| tasks | " + " | ".join(f"{h}: tokens per pass, speed-up" for h in hows) + " |")
    print("|---|" + "---|" * len(hows))
    results = {h: [replay(p, ans, h, cost) for _, p, ans in runs] for h in hows}
    for kind in kinds:
        pick = [i for i, (k, _, _) in enumerate(runs)
                if kind == "all" or k == kind or (kind == "grounded" and k != "story")]
        cells = []
        for h in hows:
            tokens = sum(results[h][i][0] for i in pick)
            passes = sum(results[h][i][1] for i in pick)
            seconds = sum(results[h][i][2] for i in pick)
            cells.append(f"{tokens / passes:.2f}, {tokens * cost[1] / seconds:.2f}x")
        print(f"| {kind} ({len(pick)}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
