"""edge runtime: KV-cached generation, sampling, streaming, run-time adapters, bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from nomoat.edge.adapters import AdapterError
from nomoat.edge.generate import GenerationError, Generator
from nomoat.edge.manifest import ModelError
from nomoat.edge.sampling import SamplingParams
from nomoat.export.packing import pack_adapter


@pytest.fixture(scope="module")
def int4(exported):
    return exported("int4-tiny")


@pytest.fixture(scope="module")
def slots(exported):
    return exported("slots", lora_rank=8, precision="fp32")


@pytest.fixture(scope="module")
def packed(slots, adapters, tmp_path_factory):
    root = tmp_path_factory.mktemp("packed")
    out = []
    for a in adapters:
        pack_adapter(a, slots, root / f"{a.name}.onnx_adapter")
        out.append(root / f"{a.name}.onnx_adapter")
    return out


def test_kv_cache_equals_full_recompute(int4):
    gen = Generator(int4)
    prompt = gen.tokenizer.encode("The capital of France is")
    cached = gen.generate(prompt, max_tokens=32).tokens
    seq = list(prompt)
    for _ in range(len(cached)):  # recompute the whole sequence for every token
        seq.append(int(np.argmax(gen.prefill(seq))))
    assert cached == seq[len(prompt):]
    assert len(cached) == 32 or gen.manifest.eos_token_ids


def test_chunked_prefill_equals_one_pass(int4):
    from nomoat.edge.profile import Profile

    ids = list(range(10, 60))
    whole = Generator(int4, Profile(prefill_chunk=0)).prefill(ids).copy()
    for chunk in (1, 16, 49):
        np.testing.assert_allclose(Generator(int4, Profile(prefill_chunk=chunk)).prefill(ids), whole, atol=1e-4)
    with pytest.raises(GenerationError, match="empty prompt"):
        Generator(int4).prefill([])


def test_prepacked_cache_gives_the_same_tokens(int4, tmp_path):
    from nomoat.edge.profile import Profile

    base = Generator(int4).generate("The capital", max_tokens=16).tokens
    for _ in range(2):  # the first load writes the cache, the second maps it
        gen = Generator(int4, Profile(optimized_model_cache=str(tmp_path / "cache")))
        # the pages loading touched are unmapped (Linux), and what generation reads faults back in intact
        assert gen.model.released_bytes > 0 or sys.platform != "linux"
        assert gen.generate("The capital", max_tokens=16).tokens == base
    (written,) = (tmp_path / "cache").iterdir()
    assert {f.name for f in written.iterdir()} == {"model.onnx", "model.onnx.data"}
    # an unwritable cache folder: a warning, and the model loads as usual
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert Generator(int4, Profile(optimized_model_cache=str(blocker / "cache"))).generate(
        "The capital", max_tokens=16).tokens == base
    # another accuracy level is another graph; it replaces this model's previous one
    Generator(int4, Profile(optimized_model_cache=str(tmp_path / "cache"), accuracy_level=1))
    (replaced,) = (tmp_path / "cache").iterdir()
    assert replaced != written


@pytest.mark.parametrize("kind", ["float32", "float16", "int8", "int4", "int4+mins"])
def test_token_embedding_reads_the_rows_as_the_table_dequantizes(kind, tmp_path):
    """The runtime's lookup (pread from the weights file) gives exactly the dequantized table's rows, in
    every layout the exporter writes; a bad id or a short file is a clear error."""
    from nomoat.edge.embedding import TokenEmbedding
    from nomoat.export.builder import Graph
    from nomoat.export.quantize import quantize_weight

    rng = np.random.default_rng(0)
    table = rng.standard_normal((300, 64)).astype(np.float32)
    g = Graph(tmp_path / "w.data", "w.data")
    g.table("padding", np.zeros(5000, np.uint8))  # the tables start at other offsets than 0
    if kind.startswith("float"):
        expected = table.astype(kind).astype(np.float32)
        spec = {"weight": g.table("e", table.astype(kind))}
    else:
        blocks = quantize_weight(table, 4 if kind.startswith("int4") else 8, 32, "rtn")
        if kind == "int4+mins":  # GGUF Q4_1
            blocks.mins = rng.standard_normal(blocks.scales.shape).astype(np.float32)
        expected = blocks.dequantize()
        spec = {"weight": g.table("q", blocks.packed), "bits": blocks.bits, "block_size": 32,
                "scales": g.table("s", blocks.scales)}
        if blocks.mins is not None:
            spec["mins"] = g.table("m", blocks.mins)
    g.data.close()
    lookup = TokenEmbedding(tmp_path, {"file": "w.data", **spec}, 300, 64)
    ids = [0, 299, 17, 17, 5]
    assert np.array_equal(lookup(ids), expected[ids])
    with pytest.raises(ValueError, match="out of range"):
        lookup([300])
    lookup.close()
    with open(tmp_path / "w.data", "r+b") as f:
        f.truncate(spec["weight"]["offset"] + 10)
    with pytest.raises(ValueError, match="shorter than its manifest says"):
        TokenEmbedding(tmp_path, {"file": "w.data", **spec}, 300, 64)([299])


def test_the_graph_takes_embeddings_and_holds_no_lookup(exported, tiny_tied):
    """Format 2: the runtime looks tokens up; the graph has no Gather over the vocabulary."""
    import onnx

    tied = exported("int4-tied", src=tiny_tied)
    m = json.loads((tied / "nomoat.json").read_text())
    assert m["format_version"] == 2 and m["graph"]["inputs"][0] == "inputs_embeds"
    graph = onnx.load(tied / "model.onnx", load_external_data=False).graph
    assert [i.name for i in graph.input][0] == "inputs_embeds"
    assert not [n for n in graph.node if n.op_type == "Gather"]
    # the tied lm_head reads the same bytes the lookup reads
    (qweight,) = [t for t in graph.initializer if t.name == "lm_head.qweight"]
    offset = {e.key: e.value for e in qweight.external_data}["offset"]
    assert int(offset) == m["embedding"]["weight"]["offset"]


@pytest.mark.parametrize("tied", [True, False])
def test_the_lm_head_in_row_chunks_gives_the_same_logits(tied, tiny, tiny_tied, tmp_path, monkeypatch):
    """The lm_head as several MatMulNBits over row chunks (smaller prepack buffers at load) computes what one
    does; the chunks are views of one stored table, consecutive in the file."""
    import onnx
    from conftest import export as export_folder
    from nomoat.export import builder

    src = tiny_tied if tied else tiny
    whole = export_folder(src, tmp_path / "whole", max_length=64)
    monkeypatch.setattr(builder, "LM_HEAD_ROWS", 64)
    chunked = export_folder(src, tmp_path / "chunked", max_length=64)
    graph = onnx.load(chunked / "model.onnx", load_external_data=False).graph
    heads = [n for n in graph.node if n.name.startswith("lm_head.") and n.op_type == "MatMulNBits"]
    vocab = json.loads((chunked / "nomoat.json").read_text())["vocab_size"]
    assert len(heads) == -(-vocab // 64) > 1 and any(n.op_type == "Concat" for n in graph.node)
    offsets = [int({e.key: e.value for e in t.external_data}["offset"])
               for t in graph.initializer if re.fullmatch(r"lm_head\.\d+\.qweight", t.name)]
    assert offsets == sorted(offsets) and len(set(np.diff(offsets))) == 1  # one table, equal steps
    a, b = Generator(whole), Generator(chunked)
    ids = a.encode("The capital of France is")
    np.testing.assert_array_equal(a.prefill(ids), b.prefill(ids))


def test_a_format_1_folder_with_the_lookup_in_the_graph_still_runs(exported, tiny_tied, tmp_path):
    """Folders exported before format 2 take token ids (a Gather in the graph): same logits as format 2."""
    import shutil

    import onnx
    from onnx import TensorProto, helper

    new = exported("fp32-tied", src=tiny_tied, precision="fp32")
    old = tmp_path / "format1"
    shutil.copytree(new, old)
    model = onnx.load(old / "model.onnx", load_external_data=False)
    graph = model.graph
    embeds = graph.input[0]
    assert embeds.name == "inputs_embeds"
    graph.node.insert(0, helper.make_node("Gather", ["model.embed_tokens", "input_ids"], ["inputs_embeds"]))
    graph.input.remove(embeds)
    graph.input.insert(0, helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "sequence"]))
    onnx.save(model, old / "model.onnx")
    m = json.loads((old / "nomoat.json").read_text())
    m["format_version"] = 1
    del m["embedding"]
    (old / "nomoat.json").write_text(json.dumps(m))
    a, b = Generator(new), Generator(old, verify_files=False)
    assert b.embedding is None
    ids = a.encode("The capital of France is")
    np.testing.assert_array_equal(a.prefill(ids), b.prefill(ids))
    assert a.generate("The capital", max_tokens=8).tokens == b.generate("The capital", max_tokens=8).tokens


@pytest.mark.skipif(sys.platform != "linux", reason="MADV_DONTNEED on /proc/self/smaps mappings: Linux only")
def test_releasing_load_pages_never_drops_written_pages(tmp_path):
    """release_load_pages unmaps clean mappings of .data files under the given folders (their contents fault
    back in), and leaves alone a mapping with a copy-on-write page, whose write would be lost."""
    import mmap

    from nomoat.edge.model import release_load_pages

    clean, written = tmp_path / "clean.onnx.data", tmp_path / "written.onnx.data"
    for f in (clean, written):
        f.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    with clean.open("rb") as a, written.open("rb") as b:
        ro = mmap.mmap(a.fileno(), 0, access=mmap.ACCESS_COPY)
        cow = mmap.mmap(b.fileno(), 0, access=mmap.ACCESS_COPY)
        assert sum(ro[i] for i in range(0, len(ro), 4096)) == 0  # touch every page (byte 0 of each is 0)
        cow[4096] = 255  # a private page
        assert release_load_pages([tmp_path / "elsewhere"]) == 0
        released = release_load_pages([tmp_path])
        assert released >= 1 << 20  # the clean mapping, all of it
        assert ro[:256] == bytes(range(256)) and ro[-1] == 255  # read back from the file
        assert cow[4096] == 255  # the written page survived
        ro.close()
        cow.close()


def test_another_accuracy_level_writes_nothing_beside_the_model(int4):
    from nomoat.edge.profile import Profile

    before = sorted(f.name for f in int4.iterdir())
    gen = Generator(int4, Profile(accuracy_level=1))  # the graph is changed in memory, not copied
    assert sorted(f.name for f in int4.iterdir()) == before
    base = Generator(int4, Profile(accuracy_level=4)).prefill(list(range(10, 30)))
    changed = gen.prefill(list(range(10, 30)))
    assert not np.array_equal(changed, base)  # the int8 and fp32 kernels really differ ...
    np.testing.assert_allclose(changed, base, atol=0.1)  # ... by rounding


def test_prefill_session_for_long_prompts(exported, tmp_path):
    """profile.prefill_accuracy_level: long prompts through a level-1 session writing the same KV cache."""
    from nomoat.edge.profile import Profile

    folder = exported("int4-head4", lm_head="int4")  # every layer 4-bit: its prefill session is all level 1
    short, long = list(range(10, 20)), list(range(10, 60))
    two = Generator(folder, Profile(prefill_accuracy_level=1, prefill_min_tokens=32, prefill_chunk=16,
                                    optimized_model_cache=str(tmp_path / "cache")))
    assert two.model.prefill_session is not None
    level4, level1 = Generator(folder, Profile(accuracy_level=4)), Generator(folder, Profile(accuracy_level=1))
    np.testing.assert_array_equal(two.prefill(short), level4.prefill(short))  # short prompts: the main session
    np.testing.assert_allclose(two.prefill(long), level1.prefill(long), atol=1e-5)
    # decoding continues in the level-4 session on the cache the level-1 session wrote
    step = two.decode_one_token(7, len(long))
    level1.prefill(long)
    np.testing.assert_allclose(step, level1.decode_one_token(7, len(long)), atol=0.1)
    assert not np.array_equal(step, level1.decode_one_token(7, len(long)))
    # both sessions are cached, apart: loading again maps them and gives the same logits
    assert len(list((tmp_path / "cache").iterdir())) == 2
    again = Generator(folder, Profile(prefill_accuracy_level=1, prefill_min_tokens=32, prefill_chunk=16,
                                      optimized_model_cache=str(tmp_path / "cache")))
    np.testing.assert_allclose(again.prefill(long), level1.prefill(long), atol=1e-5)
    # no second session where it would change nothing: the same level, or no 4-bit layers
    assert Generator(folder, Profile(prefill_accuracy_level=4)).model.prefill_session is None
    assert Generator(exported("slots", lora_rank=8, precision="fp32"),
                     Profile(prefill_accuracy_level=1)).model.prefill_session is None


def test_prefill_session_applies_adapters(exported, adapters, tmp_path):
    from nomoat.edge.profile import Profile

    folder = exported("int4-slots", lora_rank=8, lm_head="int4")
    pack_adapter(adapters[0], folder, tmp_path / "a1.onnx_adapter")
    long = list(range(10, 60))
    outs = []
    for profile in (Profile(accuracy_level=1), Profile(prefill_accuracy_level=1, prefill_min_tokens=32)):
        gen = Generator(folder, profile)
        gen.load_adapter(tmp_path / "a1.onnx_adapter")
        gen.select_adapters((("a1", 1.0),))
        outs.append(gen.prefill(long).copy())
        gen.select_adapters(())
        outs.append(gen.prefill(long).copy())
    assert not np.allclose(outs[0], outs[1], atol=1e-3)  # the adapter matters
    np.testing.assert_allclose(outs[2], outs[0], atol=1e-4)  # the prefill session gets the adapter's tensors
    np.testing.assert_allclose(outs[3], outs[1], atol=1e-4)


def test_seed_reproducible_and_different_seeds_differ(int4):
    gen = Generator(int4)
    p = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, min_p=0.01, repetition_penalty=1.1, seed=7)
    a = gen.generate("hello", max_tokens=24, params=p).tokens
    b = gen.generate("hello", max_tokens=24, params=p).tokens
    c = gen.generate("hello", max_tokens=24, params=SamplingParams(temperature=1.0, seed=8)).tokens
    assert a == b and a != c


def test_stream_deltas_join_to_text_and_stop_strings_cut(int4):
    gen = Generator(int4)
    pieces = list(gen.stream("café 東京", max_tokens=40, params=SamplingParams(temperature=1.2, seed=3)))
    result = pieces[-1]
    assert "".join(pieces[:-1]) == result.text
    assert result.text == gen.tokenizer.decode(result.tokens).rstrip("\ufffd")  # (a cut last character is dropped)
    # stop at a string the unconstrained text contains: output ends right before it
    stop = result.text[5:8]
    assert len(stop) == 3
    pieces = list(gen.stream("café 東京", max_tokens=40, params=SamplingParams(temperature=1.2, seed=3), stop=[stop]))
    stopped = pieces[-1]
    assert stopped.text == result.text[: result.text.find(stop)] and stopped.finish_reason == "stop"
    assert "".join(pieces[:-1]) == stopped.text


def test_streaming_multibyte_characters(int4):
    gen = Generator(int4)
    # feed byte-level tokens of multi-byte characters one by one through the decoder
    from nomoat.edge.text import TextDecoder

    ids = gen.tokenizer.encode("東京 😀 naïve")
    dec = TextDecoder(gen.tokenizer)
    deltas = [dec.add(t) for t in ids] + [dec.flush()]
    assert "".join(deltas) == "東京 😀 naïve"
    assert all("\ufffd" not in d for d in deltas)


def test_a_character_cut_by_max_tokens_is_left_out_not_replaced(int4):
    """max_tokens can end generation inside a multi-byte character: the final text ends before it (as llama.cpp's
    server does), never in U+FFFD."""
    from nomoat.edge.text import TextDecoder

    gen = Generator(int4)
    ids = gen.tokenizer.encode("東京😀")
    cuts = [n for n in range(1, len(ids)) if gen.tokenizer.decode(ids[:n]).endswith("\ufffd")]
    assert cuts, "the tiny tokenizer splits these characters over several tokens"
    for n in cuts:
        dec = TextDecoder(gen.tokenizer)
        text = "".join([dec.add(t) for t in ids[:n]] + [dec.flush()])
        assert "\ufffd" not in text and "東京😀".startswith(text), (n, text)


def test_incremental_decoding_equals_one_decode_of_a_long_text(int4):
    """Deltas come from decoding a few tokens back, not the whole text each time: over a long mixed text they
    still join to exactly one decode of all the ids, and a stop string far in is cut exactly."""
    from nomoat.edge.text import TextDecoder

    gen = Generator(int4)
    text = "".join(f"Line {i}: naïve café, 東京 {i * 7} 😀 — ok.\n" for i in range(60))
    ids = gen.tokenizer.encode(text)
    assert len(ids) > 500
    dec = TextDecoder(gen.tokenizer)
    assert "".join([dec.add(t) for t in ids] + [dec.flush()]) == gen.tokenizer.decode(ids) == dec.text
    dec = TextDecoder(gen.tokenizer, stop=["東京 350"])
    pieces = []
    for t in ids:
        pieces.append(dec.add(t))
        if dec.stopped:
            break
    assert "".join(pieces) == dec.text == text[: text.index("東京 350")]


def test_chat_template(int4):
    gen = Generator(int4)
    text = gen.tokenizer.chat([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert gen.generate([{"role": "user", "content": "hi"}], max_tokens=3).prompt_tokens > 3


def test_timings_reported(int4):
    r = Generator(int4).generate("The quick brown fox", max_tokens=8)
    assert r.timings["prefill_tok_s"] > 0 and r.usage["prompt_tokens"] == r.prompt_tokens


def test_prompt_cache_feeds_only_what_the_cache_lacks(int4):
    """A follow-up prompt (a chat's next turn) is fed from the first token the cache does not hold: the tokens
    and (within 1e-4 on this tiny model) the logits of a fresh prefill; the same prompt again, bit for bit."""
    from nomoat.edge.profile import Profile

    gen, fresh = Generator(int4), Generator(int4, Profile(prompt_cache=False))
    first_ids = gen.encode("The capital of France is")
    first = gen.generate(first_ids, max_tokens=8)
    assert first.timings["cached_tokens"] == 0
    follow = first_ids + first.tokens + gen.encode(" And of Spain?")
    again = gen.generate(follow, max_tokens=8)
    held = len(first_ids) + len(first.tokens) - (first.finish_reason == "length")  # the last token was never fed
    assert again.timings["cached_tokens"] == held > len(first_ids)
    assert again.tokens == fresh.generate(follow, max_tokens=8).tokens
    assert fresh.generate(follow, max_tokens=8).timings["cached_tokens"] == 0  # off in that profile

    diverging = follow[:5] + [7, 8, 9]  # shares five tokens with the cache
    logits, reused = gen.prompt_logits(diverging)
    assert reused == 5
    np.testing.assert_allclose(logits, fresh.prefill(diverging), atol=1e-4)
    repeat, reused = gen.prompt_logits(diverging)
    assert reused == len(diverging)
    np.testing.assert_array_equal(repeat, logits)
    gen.decode_one_token(11, 0)  # overwrites position 0: nothing cached any more
    assert gen.cached_prefix(diverging) == 0


def test_prompt_cache_is_dropped_when_the_adapters_change(slots, packed):
    gen = Generator(slots)
    ids = gen.encode("The capital of France")
    base = gen.generate(ids, max_tokens=8)
    assert gen.generate(ids, max_tokens=8).timings["cached_tokens"] == len(ids)
    gen.load_adapter(packed[0])
    on = gen.generate(ids, max_tokens=8, adapters=(("a1", 1.0),))
    assert on.timings["cached_tokens"] == 0 and on.tokens != base.tokens
    assert gen.generate(ids, max_tokens=8, adapters=(("a1", 1.0),)).timings["cached_tokens"] == len(ids)
    gen.load_adapter(packed[1], "a1")  # a new version under the same name (a fleet push)
    assert gen.generate(ids, max_tokens=8, adapters=(("a1", 1.0),)).timings["cached_tokens"] == 0
    off = gen.generate(ids, max_tokens=8)
    assert off.timings["cached_tokens"] == 0 and off.tokens == base.tokens


def test_adapter_changes_output_and_off_restores_base(slots, packed):
    gen = Generator(slots)
    base = gen.generate("The capital", max_tokens=16)
    name = gen.load_adapter(packed[0])
    assert name == "a1"
    on = gen.generate("The capital", max_tokens=16, adapters=(("a1", 1.0),))
    off = gen.generate("The capital", max_tokens=16)
    assert on.tokens != base.tokens
    assert off.tokens == base.tokens
    ids = gen.tokenizer.encode("The capital of")
    from nomoat.edge.fidelity import teacher_forced_logits

    np.testing.assert_array_equal(teacher_forced_logits(gen, ids), teacher_forced_logits(Generator(slots), ids))


def test_adapters_with_an_int8_kv_cache(exported, adapters, tmp_path):
    """LoRA slots and an int8 cache together: calibrated with no adapter, switched like any other."""
    folder = exported("slots-kv8", lora_rank=8, precision="fp32", kv_dtype="int8")
    pack_adapter(adapters[0], folder, tmp_path / "a1.onnx_adapter")
    gen = Generator(folder)
    base = gen.generate("The capital", max_tokens=16).tokens
    gen.load_adapter(tmp_path / "a1.onnx_adapter")
    assert gen.generate("The capital", max_tokens=16, adapters=(("a1", 1.0),)).tokens != base
    assert gen.generate("The capital", max_tokens=16).tokens == base


def test_two_stacked_adapters_equal_merged_export(slots, packed, adapters, exported):
    from nomoat.edge.fidelity import teacher_forced_logits

    merged = exported("merged-both", precision="fp32", loras=[(adapters[0], 1.0), (adapters[1], 0.5)])
    gen = Generator(slots)
    for f in packed:
        gen.load_adapter(f)
    ids = gen.tokenizer.encode("The quick brown fox jumps")
    stacked = teacher_forced_logits(gen, ids, [("a1", 1.0), ("a2", 0.5)])
    np.testing.assert_allclose(stacked, teacher_forced_logits(Generator(merged), ids), atol=1e-4, rtol=1e-4)


def test_float16_adapter_is_half_the_size_and_close(slots, packed, adapters, tmp_path):
    half = tmp_path / "a1-fp16.onnx_adapter"
    pack_adapter(adapters[0], slots, half, dtype="float16")
    assert half.stat().st_size < 0.6 * packed[0].stat().st_size
    gen = Generator(slots)
    gen.load_adapter(packed[0], "full")
    gen.load_adapter(half, "half")
    ids = gen.encode("The capital of France")
    gen.select_adapters((("full", 1.0),))
    full_logits = gen.prefill(ids).copy()
    gen.select_adapters((("half", 1.0),))
    np.testing.assert_allclose(gen.prefill(ids), full_logits, atol=2e-2)


def test_adapter_switch_is_cheap(slots, packed):
    import time

    gen = Generator(slots)
    gen.load_adapter(packed[0])
    gen.select_adapters((("a1", 1.0),))
    t = time.perf_counter()
    for _ in range(100):
        gen.select_adapters((("a1", 1.0),))
        gen.select_adapters(())
    # reported, not asserted as a speed: both selections are cached OrtValues
    print(f"adapter switch: {(time.perf_counter() - t) / 200 * 1e6:.1f} us")
    assert len(gen.adapters._combined) == 2


def test_bad_inputs(tmp_path, int4, slots, packed, exported, tiny_tied):
    import shutil

    with pytest.raises(ModelError, match="not found"):
        Generator(tmp_path / "missing")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(int4, corrupt)
    data = bytearray((corrupt / "model.onnx.data").read_bytes())
    data[5000] ^= 0xFF
    (corrupt / "model.onnx.data").write_bytes(bytes(data))
    with pytest.raises(ModelError, match="model.onnx.data is corrupt"):
        Generator(corrupt)
    # a verified file is not hashed again while its size and mtime stay; a changed one is
    import nomoat.edge.manifest as manifest_module

    checked = tmp_path / "checked"
    shutil.copytree(int4, checked)
    Generator(checked)
    hashed = []
    real = manifest_module.sha256_file
    manifest_module.sha256_file = lambda f: hashed.append(f.name) or real(f)
    try:
        Generator(checked)
        assert hashed == []
        (checked / "tokenizer.json").write_bytes((checked / "tokenizer.json").read_bytes())  # new mtime
        Generator(checked)
        assert hashed == ["tokenizer.json"]
    finally:
        manifest_module.sha256_file = real
    newer = tmp_path / "newer"
    shutil.copytree(int4, newer)
    m = json.loads((newer / "nomoat.json").read_text())
    m["format_version"] = 99
    (newer / "nomoat.json").write_text(json.dumps(m))
    with pytest.raises(ModelError, match="format version 99"):
        Generator(newer)
    m["format_version"], m["kv_cache"]["dtype"] = 1, "int4"  # a cache type from a newer exporter
    (newer / "nomoat.json").write_text(json.dumps(m))
    with pytest.raises(ModelError, match="KV cache is int4, this runtime knows float32, float16, int8"):
        Generator(newer)
    gen = Generator(slots)
    with pytest.raises(GenerationError, match="context limit is 256"):
        gen.generate(list(range(3, 300)), max_tokens=4)
    with pytest.raises(GenerationError, match="unknown adapter 'nope'"):
        gen.generate("hi", max_tokens=2, adapters=(("nope", 1.0),))
    with pytest.raises(GenerationError, match="has no LoRA slots"):
        Generator(int4).generate("hi", max_tokens=2, adapters=(("a1", 1.0),))
    other = exported("slots-tied", src=tiny_tied, lora_rank=8, precision="fp32")
    with pytest.raises(AdapterError, match="made for another base model"):
        Generator(other).load_adapter(packed[0])
    with pytest.raises(GenerationError, match="temperature"):
        gen.generate("hi", params=SamplingParams(temperature=-1))


def test_pack_rejects_rank_above_slots(tiny, slots, tmp_path):
    from conftest import make_adapter

    big = make_adapter(tiny, tmp_path / "r16", seed=5, rank=16)
    with pytest.raises(AdapterError, match="rank 16 exceeds the model's slot rank 8"):
        pack_adapter(big, slots, tmp_path / "x.onnx_adapter")
    assert not (tmp_path / "x.onnx_adapter").exists()


def test_cli_run_streams(int4):
    r = subprocess.run([sys.executable, "-m", "nomoat", "run", str(int4), "The capital", "--max-tokens", "5",
                        "--timings"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stderr.strip().splitlines()[-1])["usage"]["completion_tokens"] <= 5
    assert r.stdout.strip()
    r = subprocess.run([sys.executable, "-m", "nomoat", "run", str(int4), "The capital", "--min-p", "1.5",
                        "--repeat-penalty", "1.1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "min_p must be within [0, 1)" in r.stderr


def test_cli_chat_keeps_answering_when_the_history_outgrows_the_context(int4, tmp_path):
    """Older turns make way (the system message stays), with a notice; the prompt cache feeds the new ones."""
    (tmp_path / "small.toml").write_text("context_length = 96\n")
    lines = "".join(f"Tell me about the number {i} and its neighbours.\n" for i in range(6))
    r = subprocess.run([sys.executable, "-m", "nomoat", "chat", str(int4), "--max-tokens", "12", "--temperature", "0",
                        "--system", "Be brief.", "--profile", str(tmp_path / "small.toml")],
                       input=lines, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "error" not in r.stderr and "oldest messages no longer fit the context of 96 tokens" in r.stderr
    assert r.stdout.count("> ") >= 6  # a prompt for every line, every line answered


def test_edge_does_not_import_torch(int4):
    code = ("import sys; from nomoat.edge.generate import Generator; Generator(sys.argv[1]).generate('hi', max_tokens=2); "
            "import nomoat.edge.cli, nomoat.edge.bench; bad = [m for m in ('torch', 'transformers', 'optimum', 'onnx') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code, str(int4)], check=True, timeout=120)


def test_cli_bench_reports_every_figure(int4):
    from click.testing import CliRunner
    from nomoat.edge.cli import main

    result = CliRunner().invoke(main, ["bench", str(int4), "--runs", "1", "--long-context", "64", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    for key in ("prefill_128_tok_s", "decode_128_tok_s", "decode_at_64_tok_s", "rewrite_plain_tok_s",
                "rewrite_lookup_6_tok_s"):
        assert report[key]["median"] > 0
    assert report["rewrite_lookup_tokens_per_pass"]["median"] >= 1
    assert report["load_s"]["median"] >= 0  # the tiny model loads in milliseconds
    assert report["peak_rss_mib"] > 0
    assert 0 < report["rss_after_mib"] <= report["peak_rss_mib"] or sys.platform != "linux"
    table = CliRunner().invoke(main, ["bench", str(int4), "--runs", "1", "--long-context", "64"]).output
    assert "decode_128_tok_s" in table and "not verified at export" in table  # the tests export without --verify


def test_bench_peers_without_a_peer_reports_nomoat(int4, tmp_path):
    """tools/bench_peers.py: a llama.cpp or onnxruntime-genai that cannot run is reported and skipped, nomoat's
    figures remain."""
    from conftest import ROOT

    done = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_peers.py"), "--model", str(int4),
                           "--gguf", str(tmp_path / "none.gguf"), "--runs", "1", "--long-context", "64",
                           "--llama-python", str(tmp_path / "no-python"), "--genai-model", str(tmp_path / "none"),
                           "--genai-python", str(tmp_path / "no-python")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("engine failed") == 2 and "nomoat only" in done.stderr
    rows = {line.split("  ")[0]: line for line in done.stdout.splitlines()}
    assert float(rows["decode 128 tok/s"].split()[-1]) > 0 and float(rows["peak RSS MiB"].split()[-1]) > 0


def test_bench_peers_rounds_give_median_ratios_with_their_range(int4, tmp_path):
    """--rounds: every engine runs once per round, the ratio is the median of the per-round ratios."""
    from conftest import ROOT, load_tool

    tool = load_tool("bench_peers")
    ours = [{"decode_128_tok_s": {"median": 120.0}}, {"decode_128_tok_s": {"median": 90.0}},
            {"decode_128_tok_s": {"median": 100.0}}]
    peer = [{"decode_128_tok_s": 100.0}, {"decode_128_tok_s": 60.0}, {"decode_128_tok_s": 100.0}]
    assert tool.ratio(ours, peer, "decode_128_tok_s") == "1.20x (1.00-1.50)"
    assert tool.ratio(ours[:1], peer[:1], "decode_128_tok_s") == "1.20x"
    full = [{key: r["decode_128_tok_s"] for key, *_ in tool.KEYS} | {"version": "x"} for r in peer]
    assert tool.combine(full)["decode_128_tok_s"] == 100.0 and tool.combine([]) is None
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_peers.py"), "--model", str(int4),
                           "--gguf", str(tmp_path / "none.gguf"), "--runs", "1", "--rounds", "2",
                           "--long-context", "64", "--llama-python", str(tmp_path / "no-python")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("engine failed") == 2 and "rounds=2" in done.stdout, (done.stdout, done.stderr)


def test_q4_1_upper_bound_drops_exactly_the_correction_chains():
    """tools/q4_1_upper_bound.py (the timing bound in the runtime note): each Reshape -> ReduceSum ->
    MatMul(.mins_t) -> Add goes, its consumers read the MatMulNBits output; every other node stays."""
    from conftest import load_tool
    from onnx import helper

    tool = load_tool("q4_1_upper_bound")
    nodes = [helper.make_node("MatMulNBits", ["x", "w.qweight", "w.scales"], ["y"], domain="com.microsoft"),
             helper.make_node("Reshape", ["x", "shape"], ["blocks"]),
             helper.make_node("ReduceSum", ["blocks", "axes"], ["sums"]),
             helper.make_node("MatMul", ["sums", "w.mins_t"], ["correction"]),
             helper.make_node("Add", ["y", "correction"], ["y_corrected"]),
             helper.make_node("MatMul", ["y_corrected", "lora.A"], ["lora"]),  # a MatMul on no .mins_t: kept
             helper.make_node("Add", ["y_corrected", "lora"], ["out"])]
    graph = helper.make_graph(nodes, "g", [], [])
    assert tool.drop_corrections(graph) == 1
    assert [(n.op_type, list(n.input)) for n in graph.node] == [
        ("MatMulNBits", ["x", "w.qweight", "w.scales"]), ("MatMul", ["y", "lora.A"]), ("Add", ["y", "lora"])]


def test_bench_peers_fidelity_measures_each_engine_against_transformers(slots, int4, tiny, tmp_path):
    """--fidelity: every nomoat model's teacher-forced agreement with the transformers reference, side by side
    (the fp32 export is the reference; the int4 one is not)."""
    from conftest import ROOT

    done = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_peers.py"), "--model", str(slots),
                           "--model", str(int4), "--gguf", str(tiny), "--runs", "1", "--long-context", "64",
                           "--llama-python", str(tmp_path / "no-python"), "--fidelity"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    pattern = r"^nomoat (\S+) fidelity: top-1 agreement ([\d.]+)%, mean KL (-?[\d.]+)"
    found = {name: (float(agree), float(kl)) for name, agree, kl in re.findall(pattern, done.stdout, re.M)}
    assert found[slots.name][0] == 100.0 and abs(found[slots.name][1]) < 1e-4, done.stdout
    assert found[int4.name][1] > 1e-4, done.stdout


@pytest.fixture(scope="module")
def level1(exported):
    return exported("int4-level1", accuracy_level=1)


REPEATING = [10, 11, 12, 13, 14, 20, 21, 10, 11, 12, 13, 14, 20, 21, 10, 11, 12]  # drafts find what followed


def test_speculative_greedy_gives_the_tokens_of_plain_greedy(level1, int4):
    """Prompt-lookup drafts, checked in one pass: the tokens of one-at-a-time greedy decoding, in fewer passes.
    At accuracy level 1, whose one-row and several-row kernels agree to float rounding; at level 4 onnxruntime's
    int8 kernels round a several-row pass differently (SmolLM2: logits within ~1), so near-ties may go the other way."""
    for prompt in (REPEATING, Generator(level1).encode("The capital of France is")):
        plain = Generator(level1).generate(prompt, max_tokens=60, draft_tokens=0)
        spec = Generator(level1).generate(prompt, max_tokens=60, draft_tokens=6)
        assert spec.tokens == plain.tokens and spec.text == plain.text
        assert "drafted" not in plain.timings
    assert spec.timings["accepted"] > 0 and spec.timings["passes"] < len(spec.tokens)
    assert spec.timings["accepted"] <= spec.timings["drafted"]
    # a graph exported before logits_count (simulated: the runtime sees no such input) decodes plainly
    old = Generator(int4)
    old.can_speculate = False
    assert "drafted" not in old.generate(REPEATING, max_tokens=8).timings


def test_the_cache_after_speculation_serves_follow_ups(level1):
    """A refused draft stays in the cache with its keys and values, computed after the text before it: valid for
    a prompt that has that token there, and a prompt with another token there is fed from that position."""
    gen, fresh = Generator(level1), Generator(level1)
    calls = iter(range(1000))
    first = gen.generate(REPEATING, max_tokens=40, draft_tokens=6, cancelled=lambda: next(calls) >= 9)
    assert first.finish_reason == "cancelled" and len(first.tokens) == 10 and first.timings["drafted"]
    held = REPEATING + first.tokens
    for follow in (held + [30, 31, 32], held[:-1] + [30], held + gen._cached[len(held):] + [30]):
        again = gen.generate(follow, max_tokens=12, draft_tokens=6)
        assert again.timings["cached_tokens"] >= len(held) - 1
        assert again.tokens == fresh.generate(follow, max_tokens=12, draft_tokens=0).tokens


def test_speculative_sampling_keeps_the_models_distribution(level1):
    """Sampled answers (top-k 3) with and without drafts: the same distribution of the 2nd and 3rd tokens
    (400 seeded runs each; total variation < 0.12, where reading a wrong logits row gives ~0.5)."""
    gen = Generator(level1)
    every = list(range(3, min(gen.vocab, 200)))  # every token has been seen: each choice finds a draft
    params = lambda seed: SamplingParams(temperature=1.0, top_k=3, seed=seed)  # noqa: E731
    runs = {d: [gen.generate(every, max_tokens=3, params=params(s), draft_tokens=d) for s in range(400)]
            for d in (0, 4)}
    assert sum(r.timings["drafted"] for r in runs[4]) > 200
    for pos in (1, 2):
        counts = [np.bincount([r.tokens[pos] for r in runs[d] if len(r.tokens) > pos], minlength=gen.vocab)
                  for d in (0, 4)]
        p, q = (c / c.sum() for c in counts)
        assert 0.5 * np.abs(p - q).sum() < 0.12, (pos, np.flatnonzero(p), np.flatnonzero(q))


@pytest.fixture(scope="module")
def draft_level1(exported, tiny_tied):
    """Another tiny model with the same tokenizer (its own seed, tied embedding): a draft model that is often
    wrong, so that both its taken and its refused drafts are exercised."""
    return exported("draft-level1", src=tiny_tied, accuracy_level=1)


def test_a_draft_model_gives_the_tokens_of_plain_greedy(level1, draft_level1):
    """Drafts from a second model (--draft), checked in one pass: the tokens of plain greedy decoding; the draft
    model's cache follows the text from prompt to prompt (one Generator serves them all)."""
    from nomoat.edge.profile import Profile

    plain = Generator(level1)
    for drafter, taken_all in ((draft_level1, False), (level1, True)):  # another model; the model itself
        spec = Generator(level1, Profile(draft_model=str(drafter)))
        assert spec.drafter and spec.drafter.gen.drafter is None
        for prompt in (REPEATING, plain.encode("The capital of France is"), REPEATING[:5], REPEATING):
            want = plain.generate(prompt, max_tokens=40, draft_tokens=0)
            got = spec.generate(prompt, max_tokens=40, draft_tokens=4)
            assert got.tokens == want.tokens and got.text == want.text
            t = got.timings
            assert t["drafted"] > 0 and t["accepted"] <= t["drafted"]
            if taken_all:  # the model drafting for itself: its drafts are taken (a lookup draft may not be)
                assert t["passes"] < len(got.tokens) / 2
        if not taken_all:
            assert t["accepted"] < t["drafted"]
    # the draft model takes the prompt with the model's prompt (prompt time), before any draft
    spec.generate(REPEATING[:7] + [40], max_tokens=1)  # one token: no pass, no draft
    assert spec.drafter.gen._cached == REPEATING[:7] + [40]


def test_a_draft_model_with_a_shorter_context_drafts_until_it_ends(level1, exported, tiny):
    """A draft model exported for 48 tokens under a model of 256: it drafts while the text fits its context, then
    the model goes on alone; the tokens are plain greedy's either way."""
    from nomoat.edge.profile import Profile

    short = exported("draft-short", max_length=48, accuracy_level=1)
    spec = Generator(level1, Profile(draft_model=str(short)))
    assert spec.drafter.gen.model.max_length == 48
    want = Generator(level1).generate(REPEATING, max_tokens=80, draft_tokens=0)
    got = spec.generate(REPEATING, max_tokens=80, draft_tokens=4)
    assert got.tokens == want.tokens and len(got.tokens) > 48 - len(REPEATING)
    assert 0 < got.timings["drafted"] <= 48 - len(REPEATING) and got.timings["passes"] > 48


def test_a_draft_model_keeps_the_models_distribution(level1, draft_level1):
    """Sampled answers with the draft model's (greedy) drafts: the distribution of plain sampling (as for lookup)."""
    from nomoat.edge.profile import Profile

    gens = {0: Generator(level1), 4: Generator(level1, Profile(draft_model=str(draft_level1)))}
    params = lambda seed: SamplingParams(temperature=1.0, top_k=3, seed=seed)  # noqa: E731
    prompt = REPEATING[:6]
    runs = {d: [gens[d].generate(prompt, max_tokens=3, params=params(s), draft_tokens=d) for s in range(400)]
            for d in (0, 4)}
    assert sum(r.timings["drafted"] for r in runs[4]) > 200
    for pos in (1, 2):
        counts = [np.bincount([r.tokens[pos] for r in runs[d] if len(r.tokens) > pos], minlength=gens[0].vocab)
                  for d in (0, 4)]
        p, q = (c / c.sum() for c in counts)
        assert 0.5 * np.abs(p - q).sum() < 0.12, (pos, np.flatnonzero(p), np.flatnonzero(q))


def test_a_draft_model_must_share_the_tokenizer(level1, draft_level1, tmp_path):
    """A draft whose token ids mean other text is refused at load, with both names; so is a missing folder."""
    import shutil

    from nomoat.edge.manifest import sha256_file
    from nomoat.edge.profile import Profile

    other = tmp_path / "other-tokenizer"
    shutil.copytree(draft_level1, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two tokens swap ids
    (other / "tokenizer.json").write_text(json.dumps(tok))
    manifest = json.loads((other / "nomoat.json").read_text())
    manifest["files"]["tokenizer.json"] = sha256_file(other / "tokenizer.json")
    (other / "nomoat.json").write_text(json.dumps(manifest))
    with pytest.raises(GenerationError, match="another tokenizer"):
        Generator(level1, Profile(draft_model=str(other)))
    with pytest.raises(ModelError, match="not found"):
        Generator(level1, Profile(draft_model=str(tmp_path / "nowhere")))


def test_cli_run_with_a_draft_model(level1, draft_level1):
    from click.testing import CliRunner
    from nomoat.edge.cli import main

    args = ["run", str(level1), "The capital of France is", "--max-tokens", "24", "--timings"]
    plain = CliRunner().invoke(main, [*args, "--draft-tokens", "0"])
    spec = CliRunner().invoke(main, [*args, "--draft", str(draft_level1)])
    assert plain.exit_code == 0 and spec.exit_code == 0, spec.output
    assert spec.stdout == plain.stdout
    assert json.loads(spec.stderr.strip().splitlines()[-1])["drafted"] > 0
    report = json.loads(CliRunner().invoke(main, ["bench", str(level1), "--runs", "1", "--long-context", "64",
                                                  "--json", "--draft", str(draft_level1)]).stdout)
    assert report["draft_model"] and report["rewrite_draft_tokens_per_pass"]["median"] >= 1
    table = CliRunner().invoke(main, ["bench", str(level1), "--runs", "1", "--long-context", "64", "--draft",
                                      str(draft_level1)]).stdout
    assert f"draft_model                    {draft_level1.name}" in table and "rewrite_draft_6_tok_s" in table
    missing = CliRunner().invoke(main, [*args, "--draft", "/nowhere/draft"])
    assert missing.exit_code == 1 and "not found" in missing.output
    # the daemon refuses a bad draft model before it connects anywhere
    served = CliRunner().invoke(main, ["serve", str(level1), "--draft", "/nowhere/draft", "--broker",
                                       "mqtt://127.0.0.1:1"])
    assert served.exit_code == 1 and "model folder not found: /nowhere/draft" in served.output
