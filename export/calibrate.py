"""The int8 KV cache's scales, calibrated on the export itself.

onnxruntime's CPU GroupQueryAttention keeps an int8 cache with static per-channel scales
(one per layer, kv head and channel). They come from running calibration text through the
float32-KV export with the device runtime, exactly as a device would, and reading what the
cache then holds:

- keys are stored after the rotary embedding, which turns channel pairs (i, i + head_dim/2)
  by a position-dependent angle: the pair's norm bounds both channels at every position,
  so a key scale holds at positions the calibration text never reached;
- values get 10 % headroom over the largest magnitude seen.

A value beyond its scale saturates at +-127 rather than wrapping.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np

from .builder import quantize_kv_cache

HEADROOM_V = 1.1
MAX_TOKENS = 1024  # per text: the magnitudes settle well before this
CHAT = [
    {"role": "user", "content": "What is the capital of France? Answer in one word, then tell me about its history."},
    {"role": "assistant", "content": "Paris. It grew from a Gallic settlement on the Seine into the capital of "
                                     "the French kingdom and, after 1789, of the Republic."},
    {"role": "user", "content": "Écris un haïku sur la mer. Dann übersetze es ins Deutsche, 然后翻译成中文。"},
]


def calibration_texts(tokenizer) -> list[str]:
    """Prose, code and a chat: the standard library's own documentation and source, so the export needs
    no dataset and gives the same scales wherever it runs with the same Python."""
    import argparse
    import json
    import textwrap

    from jinja2 import TemplateError
    from nomoat.edge.manifest import ModelError

    prose = "\n\n".join(inspect.getdoc(m) or "" for m in (argparse, json, textwrap, inspect))
    texts = [prose, inspect.getsource(textwrap)]
    try:
        texts.append(tokenizer.chat(CHAT, add_generation_prompt=False))
    except (ModelError, TemplateError):  # no chat template, or one that refuses these roles: prose and code only
        pass
    return texts


def calibrate_kv_scales(folder: Path, texts: list[str] | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-channel int8 scales [layers, kv_heads, head_dim] for keys and values, and the tokens seen."""
    from nomoat.edge.generate import Generator

    gen = Generator(folder, verify_files=False)
    layers, (_, heads, _, dim) = gen.manifest.num_layers, gen.manifest.kv_shape
    k_max, v_max = np.zeros((layers, heads, dim)), np.zeros((layers, heads, dim))
    seen = 0
    for text in texts or calibration_texts(gen.tokenizer):
        ids = gen.encode(text)[: min(MAX_TOKENS, gen.model.max_length - 1)]
        gen.prefill(ids)
        seen += len(ids)
        for layer in range(layers):
            k = gen.model.kv[2 * layer].numpy()[0, :, : len(ids)]  # [heads, tokens, dim]
            v = gen.model.kv[2 * layer + 1].numpy()[0, :, : len(ids)]
            pair = np.hypot(k[..., : dim // 2], k[..., dim // 2:]).max(1)
            k_max[layer] = np.maximum(k_max[layer], np.concatenate([pair, pair], -1))
            v_max[layer] = np.maximum(v_max[layer], np.abs(v).max(1))
    tiny = 1e-6  # a channel that stayed zero still needs a positive scale
    return np.maximum(k_max, tiny) / 127, np.maximum(v_max * HEADROOM_V, tiny) / 127, seen


INT8_GRAPH, FLOAT32_GRAPH = "model.kv-int8.onnx", "model.kv-float32.onnx"


def kv_cache_graphs(folder: Path, main: str, texts: list[str] | None = None) -> tuple[dict | None, dict]:
    """Calibrate the float32-KV export in `folder` and write its int8-KV graph too, so that a device's profile can
    pick either cache (kv_cache) without another export; `main` ("float32" or "int8") is the one that stays
    model.onnx. Returns the main graph's KV quantization (None for float32) and the other graph's manifest entry.
    The graphs share the weights file: the second costs ~0.2 MB."""
    import onnx

    k_scales, v_scales, seen = calibrate_kv_scales(folder, texts)
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    quantize_kv_cache(model, k_scales, v_scales)
    quantization = {"scales": "static, per layer, kv head and channel", "calibration_tokens": seen}
    if main == "int8":
        (folder / "model.onnx").rename(folder / FLOAT32_GRAPH)
        onnx.save_model(model, str(folder / "model.onnx"))
        return quantization, {"float32": {"file": FLOAT32_GRAPH}}
    onnx.save_model(model, str(folder / INT8_GRAPH))
    return None, {"int8": {"file": INT8_GRAPH, "quantization": quantization}}
