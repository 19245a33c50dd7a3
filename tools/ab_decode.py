#!/usr/bin/env python3
"""Interleaved decode A/B of model folders in one process: small effects survive a drifting machine.

    .venv/bin/python tools/ab_decode.py models/smollm2-135m /tmp/variant --context 8 --tokens 64 --reps 8

Each repetition prefills `--context` tokens and decodes `--tokens` more (greedy, as `nomoat bench`) in every folder in turn (no graph
cache, so each folder's own graph runs); prints the median tok/s and every repetition's figure.
"""

from __future__ import annotations

import argparse
import statistics

from nomoat.edge.bench import decode_speed, experiment_profile
from nomoat.edge.generate import Generator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--context", type=int, default=8, help="prompt tokens before decoding")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", default="x86-64-dev")
    a = ap.parse_args()
    profile = experiment_profile(a.profile, a.threads, a.context + a.tokens + 1)
    gens = {f: Generator(f, profile, verify_files=False) for f in a.folders}
    prompt = [100 + (i * 37) % 40000 for i in range(a.context)]
    found: dict[str, list[float]] = {f: [] for f in gens}
    for _ in range(a.reps):
        for folder, gen in gens.items():
            gen.prefill(prompt)
            found[folder].append(decode_speed(gen, a.context, a.tokens))
    for folder, values in found.items():
        print(f"{statistics.median(values):7.1f} tok/s  {folder}  {[round(v) for v in values]}")


if __name__ == "__main__":
    main()
