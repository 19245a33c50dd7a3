"""`nomoat bench`: the figures that matter on a device, measured the same way every time.

prefill: tokens/s for a 128-token prompt; decode: tokens/s for 128 new tokens after a short
prompt; decode at ~1000 tokens of context; a grounded task (rewrite a paragraph, greedy) decoded plainly and
with speculative decoding (edge/speculate.py: prompt lookup, or the draft model given); load time; peak RSS of
this process, and its RSS after the work (the peak can be the load's: onnxruntime reads the weights twice while
it prepacks them).
"""

from __future__ import annotations

import resource
import statistics
import time

import numpy as np

from .generate import GenerationError, Generator
from .profile import Profile, load_profile


def experiment_profile(name: str, threads: int, context: int) -> Profile:
    """A profile for in-process experiments (tools/ab_decode.py, tools/profile_decode.py): these threads, room for
    `context` tokens, and no graph cache, so that each folder runs its own graph."""
    profile = load_profile(name)
    profile.threads, profile.optimized_model_cache = threads, None
    profile.context_length = max(profile.context_length, context)
    return profile


def decode_speed(gen: Generator, start: int, n: int) -> float:
    """Tokens/s of n greedy decode steps after `start` tokens of cache."""
    token = gen.vocab // 2  # any valid token; then the model's own greedy choices
    t = time.perf_counter()
    for i in range(n):
        token = int(np.argmax(gen.decode_one_token(token, start + i)))
    return n / (time.perf_counter() - t)


REWRITE = ("Rewrite this text in the past tense, keeping every fact.\n\nThe Raspberry Pi 5 has a quad-core Arm "
           "Cortex-A76 processor running at 2.4 GHz. It comes with between 4 and 16 GB of memory, two micro-HDMI "
           "ports, a PCIe interface and a power button. It costs 60 dollars for the 4 GB model.")


def grounded_speed(gen: Generator, draft_tokens: int) -> tuple[float, float]:
    """(decode tokens/s, tokens per pass) of a greedy answer to REWRITE (as a chat where the model has a template)."""
    try:
        prompt = gen.encode([{"role": "user", "content": REWRITE}])
    except GenerationError:
        prompt = gen.encode(REWRITE)
    prompt = prompt[-(gen.model.max_length // 2):]  # (a tiny test model's context)
    r = gen.generate(prompt, max_tokens=96, draft_tokens=draft_tokens)
    steps = len(r.tokens) - 1 + (r.finish_reason == "stop")
    return r.timings["decode_tok_s"], steps / max(1, r.timings.get("passes", steps))


def current_rss_mib() -> float | None:
    """This process's resident memory now (Linux/Android; None elsewhere)."""
    try:
        return round(int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024, 1)
    except (OSError, IndexError, ValueError):
        return None


def _stats(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2), "max": round(max(values), 2)}


def bench_model(folder, profile: Profile, runs: int = 5, long_context: int = 1000) -> dict:
    t = time.perf_counter()
    gen = Generator(folder, profile)
    loads = [time.perf_counter() - t]
    rng = np.random.default_rng(0)
    vocab = gen.vocab
    low = min(100, vocab // 4)  # skip the special tokens at the start of most vocabularies
    if gen.model.max_length < 200:
        raise GenerationError(f"the context limit {gen.model.max_length} is too short for the benchmark (200+)")
    long_context = min(long_context, gen.model.max_length - 40)
    prefill, decode, decode_long, plain, lookup, per_pass = [], [], [], [], [], []
    draft = gen.draft_limit(None) or 6
    how = "draft" if gen.drafter else "lookup"  # drafts from the draft model, or by prompt lookup
    gen.prefill(rng.integers(low, vocab, 16).tolist())  # warm-up
    for _ in range(runs):
        ids = rng.integers(low, vocab, 128).tolist()
        t = time.perf_counter()
        gen.prefill(ids)
        prefill.append(128 / (time.perf_counter() - t))
        gen.prefill(ids[:8])
        decode.append(decode_speed(gen, 8, 128))
        gen.prefill(rng.integers(low, vocab, long_context).tolist())
        decode_long.append(decode_speed(gen, long_context, 32))
        if gen.can_speculate:
            plain.append(grounded_speed(gen, 0)[0])
            speed, tokens = grounded_speed(gen, draft)
            lookup.append(speed)
            per_pass.append(tokens)
    # the peak of one load and the work above, as on a device; more loads (for the load time) come after it
    # because a reload's freed memory stays in the process and would count twice
    rss_after = current_rss_mib()
    # the kernel updates ru_maxrss lazily: it can trail the current RSS by a few pages
    peak_rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, rss_after or 0)
    providers = gen.model.providers
    for _ in range(min(runs, 3) - 1):
        gen = None  # one session at a time
        t = time.perf_counter()
        gen = Generator(folder, profile)
        loads.append(time.perf_counter() - t)
    return {
        "model": str(folder),
        "threads": profile.threads,
        "load_s": _stats(loads),
        "prefill_128_tok_s": _stats(prefill),
        "decode_128_tok_s": _stats(decode),
        f"decode_at_{long_context}_tok_s": _stats(decode_long),
        **({"rewrite_plain_tok_s": _stats(plain), f"rewrite_{how}_{draft}_tok_s": _stats(lookup),
            f"rewrite_{how}_tokens_per_pass": _stats(per_pass)} if plain else {}),
        "draft_model": gen.drafter.name if gen.drafter else None,
        "peak_rss_mib": round(peak_rss, 1),
        "rss_after_mib": rss_after,
        "providers": providers,
        "accuracy_level": profile.accuracy_level,
        "prefill_accuracy_level": profile.prefill_accuracy_level,  # a second session for prompts, if set
        "kv_dtype": gen.model.kv_dtype,
        "context_length": gen.model.max_length,
        "verification": gen.manifest.verification(gen.model.kv_dtype),  # the export's agreement with its reference
    }


def format_table(report: dict) -> str:
    lines = [f"{report['model']}  (threads={report['threads'] or 'auto'}, providers={report['providers']}, "
             f"{report['kv_dtype']} KV cache of {report['context_length']} tokens)"]
    for key, value in report.items():
        if isinstance(value, dict) and "median" in value:
            lines.append(f"  {key:30s} median {value['median']:>8}  min {value['min']:>8}  max {value['max']:>8}")
    if report.get("draft_model"):
        lines.append(f"  {'draft_model':30s} {report['draft_model']}")
    lines.append(f"  {'peak_rss_mib':30s} {report['peak_rss_mib']}")
    lines.append(f"  {'rss_after_mib':30s} {report['rss_after_mib']}")
    lines.append(f"  {'fidelity':30s} {describe_verification(report.get('verification'))}")
    return "\n".join(lines)


def describe_verification(v: dict | None) -> str:
    if not v:
        return "not verified at export (nomoat export --verify)"
    if "kv_cache" in v:  # the other KV cache's graph: its agreement was measured, not its greedy text
        return (f"top-1 agreement {v['top1_agreement']:.1%} over {v['tokens']} tokens, mean KL {v['mean_kl']:.4f} "
                f"(with the {v['kv_cache']} KV cache)")
    return (f"top-1 agreement {v['top1_agreement']:.1%} over {v['tokens']} tokens, mean KL {v['mean_kl']:.4f}, "
            f"greedy {'matches' if v['greedy_match'] else 'differs from'} the reference")
