#!/usr/bin/env python3
"""Prompt time of each turn of a chat, with the prompt cache (profile.prompt_cache) on and off.

    .venv/bin/python tools/bench_chat.py models/smollm2-135m --turns 6 --threads 2

Every turn sends the whole history through the chat template, as `nomoat chat` and MQTT clients do; with the
cache, only what the cache lacks is fed (the new user message, and the template's tokens around it). Greedy,
so both runs see the same answers.
"""

from __future__ import annotations

import argparse

from nomoat.edge.generate import Generator
from nomoat.edge.profile import load_profile

QUESTIONS = [
    "Explain in a few sentences how a refrigerator keeps food cold.",
    "Now explain it to a five-year-old, using a story about a polar bear who lives in a box.",
    "Which parts of that story were not quite true? List them and correct each one briefly.",
    "Write a short poem that mentions the compressor, the coils and the light inside the door.",
    "Summarise everything we discussed so far in three bullet points.",
    "Suggest two experiments a child could do at home to see evaporation cool something down.",
]


def chat(gen: Generator, turns: int, max_tokens: int) -> list[dict]:
    history, rows = [], []
    for question in (QUESTIONS * (turns // len(QUESTIONS) + 1))[:turns]:
        history.append({"role": "user", "content": question})
        r = gen.generate(history, max_tokens=max_tokens)
        history.append({"role": "assistant", "content": r.text})
        rows.append({"prompt": r.prompt_tokens, "cached": r.timings["cached_tokens"], "s": r.timings["prefill_s"]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--profile", default=None)
    a = ap.parse_args()
    runs = {}
    for cache in (False, True):
        p = load_profile(a.profile)
        p.threads, p.prompt_cache = a.threads or p.threads, cache
        runs[cache] = chat(Generator(a.model, p), a.turns, a.max_tokens)
    print("turn  prompt tokens  fed (cache off / on)  prompt time s (off / on)")
    for i, (off, on) in enumerate(zip(runs[False], runs[True], strict=True), 1):
        print(f"{i:4d}  {on['prompt']:13d}  {off['prompt'] - off['cached']:8d} / {on['prompt'] - on['cached']:<8d}"
              f"  {off['s']:8.3f} / {on['s']:.3f}")
    total = [sum(r["s"] for r in runs[c]) for c in (False, True)]
    print(f"all turns: {total[0]:.2f} s / {total[1]:.2f} s of prompt time")


if __name__ == "__main__":
    main()
