#!/usr/bin/env python3
"""Where a decode step's time goes: onnxruntime's profiler over decode steps at a given context length.

    .venv/bin/python tools/profile_decode.py models/smollm2-135m --context 1000 --tokens 32

Prefills `--context` tokens, then decodes `--tokens` greedy steps twice: once plainly (the wall time per step)
and once with onnxruntime's profiler on (a second session: same graph, same profile). Prints kernel time per
step by op type, the linears (MatMulNBits) by weight name, and how many nodes of each kind ran per step. The
profiler costs a few microseconds per node, so the small ops read high: compare rows with each other, and
against the plain wall time, not as absolute truth.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import tempfile
from pathlib import Path

import nomoat.edge.model
from nomoat.edge.bench import decode_speed, experiment_profile
from nomoat.edge.generate import Generator


def kernel_times(trace: Path, steps: int) -> tuple[collections.Counter, collections.Counter]:
    """(microseconds, node count) per op type over the last `steps` runs of an onnxruntime trace, per run."""
    events = json.loads(trace.read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    start = runs[-steps]["ts"]
    micros: collections.Counter = collections.Counter()
    nodes: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < start:
            continue
        op = e["args"]["op_name"]
        if op == "MatMulNBits":  # one row per weight kind: q_k_v, o_proj, gate_up, down_proj, lm_head
            weight = re.sub(r"^model\.layers\.\d+\.", "", e["name"].removesuffix("_kernel_time"))
            op += " " + re.sub(r"(lm_head).*", r"\1", weight.split("/")[0])
        micros[op] += e["dur"] / steps
        nodes[op] += 1 / steps
    return micros, nodes


def decode(gen: Generator, prompt: list[int], steps: int) -> float:
    """Seconds per greedy decode step after prefilling `prompt`."""
    gen.prefill(prompt)
    return 1 / decode_speed(gen, len(prompt), steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("--context", type=int, default=16, help="prompt tokens before decoding")
    ap.add_argument("--tokens", type=int, default=32, help="decode steps measured")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", default="x86-64-dev")
    a = ap.parse_args()
    profile = experiment_profile(a.profile, a.threads, a.context + a.tokens + 1)
    plain = Generator(a.folder, profile, verify_files=False)
    prompt = [(100 + i * 37) % plain.vocab for i in range(a.context)]
    wall = decode(plain, prompt, a.tokens)
    del plain

    plain_options = nomoat.edge.model._session_options
    with tempfile.TemporaryDirectory(prefix="nomoat-profile-") as trace_dir:

        def profiled_options(*args, **kwargs):  # the runtime's own session options, with the profiler on
            so = plain_options(*args, **kwargs)
            so.enable_profiling, so.profile_file_prefix = True, f"{trace_dir}/decode"
            return so

        nomoat.edge.model._session_options = profiled_options
        try:
            gen = Generator(a.folder, profile, verify_files=False)
        finally:
            nomoat.edge.model._session_options = plain_options
        traced = decode(gen, prompt, a.tokens)
        micros, nodes = kernel_times(Path(gen.model.session.end_profiling()), a.tokens)

    total = sum(micros.values())
    print(f"{a.folder}: context {a.context}, {a.tokens} steps, {a.threads} threads")
    print(f"wall per step: {wall * 1e3:.2f} ms plain ({1 / wall:.1f} tok/s), {traced * 1e3:.2f} ms profiled; "
          f"kernels {total / 1e3:.2f} ms")
    print(f"{'op':34s} {'us/step':>9s} {'share':>6s} {'nodes':>6s}")
    for op, us in micros.most_common():
        print(f"{op:34s} {us:9.1f} {us / total:6.1%} {nodes[op]:6.0f}")


if __name__ == "__main__":
    main()
