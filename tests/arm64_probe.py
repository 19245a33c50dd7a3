"""Runs inside emulated aarch64 (and on the host, for the reference): greedy tokens and prefill logits as JSON.

    python arm64_probe.py INT4_MODEL SLOTS_MODEL ADAPTER_FILE KV16_MODEL GGUF_MODEL KV8_MODEL COMPACT_MODEL

Only the installed `nomoat` package is used (the test runs this file from a folder outside the checkout).
"""
import json
import platform
import sys

import onnxruntime
from nomoat.edge.doctor import fitting_profiles, inspect_device
from nomoat.edge.generate import Generator
from nomoat.edge.profile import Profile

PROMPT = "The capital of France is"


def main(int4_model: str, slots_model: str, adapter: str, kv16_model: str, gguf_model: str, kv8_model: str,
         compact_model: str) -> dict:
    device = inspect_device()
    out: dict = {"machine": platform.machine(), "onnxruntime": onnxruntime.__version__, "cpu": device.cpu,
                 "fitting_profiles": fitting_profiles(device)}
    for level in (1, 4):  # 1: fp32 compute path, 4: int8 activations (dot-product kernels where the CPU has them)
        g = Generator(int4_model, Profile(accuracy_level=level, threads=1))
        out[f"acc{level}_logits"] = g.prefill(g.encode(PROMPT)).ravel().tolist()
        out[f"acc{level}_tokens"] = g.generate(PROMPT, max_tokens=8).tokens
    g = Generator(slots_model, Profile(accuracy_level=1, threads=1))  # fp32 path: comparable across CPUs
    out["base"] = g.generate(PROMPT, max_tokens=8).tokens
    name = g.load_adapter(adapter)
    out["adapter"] = g.generate(PROMPT, max_tokens=8, adapters=((name, 1.0),)).tokens
    out["off"] = g.generate(PROMPT, max_tokens=8).tokens
    # half-precision KV cache (fp16 attention) with the prompt fed in chunks of 2
    g = Generator(kv16_model, Profile(accuracy_level=1, threads=1, prefill_chunk=2))
    out["kv16"] = g.generate(PROMPT, max_tokens=8).tokens
    # a GGUF import (fp16 block scales cast in the graph, folded at load)
    g = Generator(gguf_model, Profile(accuracy_level=1, threads=1))
    out["gguf_logits"] = g.prefill(g.encode(PROMPT)).ravel().tolist()
    out["gguf_tokens"] = g.generate(PROMPT, max_tokens=8).tokens
    # a follow-up that extends the cached prompt and answer (the prompt cache)
    follow = g.generate(g.encode(PROMPT) + out["gguf_tokens"] + g.encode(" and"), max_tokens=8)
    out["followup"] = {"tokens": follow.tokens, "cached": follow.timings["cached_tokens"]}
    # int8 KV cache (static per-channel scales)
    g = Generator(kv8_model, Profile(accuracy_level=1, threads=1))
    out["kv8_logits"] = g.prefill(g.encode(PROMPT)).ravel().tolist()
    out["kv8_tokens"] = g.generate(PROMPT, max_tokens=8).tokens
    # a compact folder (a Q4_K_M-like GGUF): its rows converted here, checked against the exporter's sha256
    g = Generator(compact_model, Profile(accuracy_level=1, threads=1))
    out["compact_logits"] = g.prefill(g.encode(PROMPT)).ravel().tolist()
    # a draft model (the model drafting for itself) on the shared thread pool; last, because once the process has
    # that pool every later session runs on it
    g = Generator(int4_model, Profile(accuracy_level=1, threads=1, draft_model=int4_model))
    r = g.generate(PROMPT, max_tokens=8, draft_tokens=4)
    out["drafted"] = {"tokens": r.tokens, "drafted": r.timings["drafted"], "accepted": r.timings["accepted"]}
    return out


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:8])))
