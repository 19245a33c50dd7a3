"""nomoat export: fp32 equals transformers, int4 stays close, LoRA merged and slotted agree, bad input fails cleanly."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import export, load_tool, write_json
from nomoat.edge.adapters import Adapter
from nomoat.edge.doctor import model_memory_mb
from nomoat.edge.fidelity import teacher_forced_logits
from nomoat.edge.generate import Generator
from nomoat.edge.manifest import ModelError
from nomoat.export.lora import load_adapter, slot_tensors
from nomoat.export.sources import ExportError
from nomoat.export.verify import compare, load_reference, reference_logits

IDS = [5, 17, 42, 99, 120, 7, 250, 33, 61, 300, 11, 2]


def logits_of(folder, ids=IDS, adapters=()):
    return teacher_forced_logits(Generator(folder), ids, adapters)


@pytest.mark.parametrize("which", ["tiny", "tiny_tied"])
def test_fp32_export_equals_transformers(which, request, exported):
    src = request.getfixturevalue(which)
    folder = exported(f"fp32-{which}", src=src, precision="fp32")
    ref = reference_logits(load_reference(src), IDS)
    np.testing.assert_allclose(logits_of(folder), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("which", ["tiny", "tiny_tied"])
def test_int4_export_is_close(which, request, exported):
    src = request.getfixturevalue(which)
    folder = exported(f"int4-{which}", src=src)
    manifest = json.loads((folder / "nomoat.json").read_text())
    assert manifest["quantization"]["weights"].get("rtn-int4") == 7 * 2
    with open(folder / "model.onnx", "rb") as f:
        assert b"MatMulNBits" in f.read()
    ref, out = reference_logits(load_reference(src), IDS), logits_of(folder)
    agree, kl, _ = compare(ref, out)
    # a random model has near-ties, so top-1 flips easily; the logits themselves stay close
    assert agree >= 0.5 and kl < 0.05, (agree, kl)
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 0.4  # unrelated logits give ~1.4


@pytest.mark.parametrize("method", ["rtn", "rtn-asym", "k_quant", "hqq"])
def test_quant_methods_run_as_their_dequantized_weights(method):
    """The blocks (and zero points) each method writes mean in MatMulNBits what `dequantize` says."""
    import onnxruntime as ort
    from nomoat.export.quantize import pack_zero_points, quantize_weight
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    n, k = 48, 96  # three blocks per row: zero points need padding to whole bytes
    w = rng.standard_normal((n, k)).astype(np.float32)
    blocks = quantize_weight(w, 4, 32, method)
    assert np.abs(blocks.dequantize() - w).max() < 0.25 * np.abs(w).max()
    inits = [numpy_helper.from_array(blocks.packed, "B"), numpy_helper.from_array(blocks.scales, "S")]
    if blocks.zero_points is not None:
        inits.append(numpy_helper.from_array(pack_zero_points(blocks.zero_points), "Z"))
    node = helper.make_node("MatMulNBits", ["X", *[t.name for t in inits]], ["Y"], domain="com.microsoft",
                            K=k, N=n, bits=4, block_size=32, accuracy_level=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    x = rng.standard_normal((3, k)).astype(np.float32)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"X": x})[0]
    np.testing.assert_allclose(y, x @ blocks.dequantize().T, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["rtn-asym", "k_quant", "hqq"])
def test_int4_export_with_other_quant_methods_is_close(method, tiny, exported):
    folder = exported(f"int4-{method}", quant_method=method)
    assert json.loads((folder / "nomoat.json").read_text())["quantization"]["method"] == method
    ref, out = reference_logits(load_reference(tiny), IDS), logits_of(folder)
    agree, kl, _ = compare(ref, out)
    assert agree >= 0.5 and kl < 0.05, (agree, kl)


def test_float16_kv_cache_halves_it_and_stays_close(exported):
    full, half = exported("fp32-base", precision="fp32"), exported("fp32-kv16", precision="fp32", kv_dtype="float16")
    gen = Generator(half)
    assert {buf.data_type() for buf in gen.model.kv} == {"tensor(float16)"}
    assert json.loads((half / "nomoat.json").read_text())["kv_cache"]["dtype"] == "float16"
    np.testing.assert_allclose(logits_of(half), logits_of(full), atol=2e-2)
    assert gen.generate("The capital", max_tokens=16).tokens == Generator(full).generate("The capital",
                                                                                          max_tokens=16).tokens


def test_int8_kv_cache_quarters_it_stores_the_calibrated_values_and_stays_close(exported):
    full, small = exported("fp32-base", precision="fp32"), exported("fp32-kv8", precision="fp32", kv_dtype="int8")
    kv = json.loads((small / "nomoat.json").read_text())["kv_cache"]
    assert kv["dtype"] == "int8" and kv["quantization"]["calibration_tokens"] > 100
    a, b = Generator(full), Generator(small)
    assert {buf.data_type() for buf in b.model.kv} == {"tensor(int8)"}
    ids = b.encode("The quick brown fox jumps over the lazy dog, and then it runs away into the forest.")
    a.prefill(ids)
    b.prefill(ids)
    # layer 0's cache (the same float keys and values in both) is the float cache divided by the graph's
    # per-(head, channel) scales, rounded; every layer's scales use the int8 range
    scales = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(small / "model.onnx").graph.initializer
              if t.name.endswith(("k_scale", "v_scale"))}
    assert len(scales) == len(a.model.kv)  # a key and a value buffer per layer
    for i, (buf, (_, present)) in enumerate(zip(b.model.kv, b.model.kv_names, strict=True)):
        layer, part = present.split(".")[1:]
        scale = scales[f"model.layers.{layer}.self_attn.gqa.{part[0]}_scale"]  # [kv_heads, 1, head_dim]
        got = buf.numpy()[0, :, :len(ids)]
        assert np.abs(got).max() > 32
        if layer == "0":
            want = np.clip(np.round(a.model.kv[i].numpy()[0, :, :len(ids)] / scale), -128, 127)
            assert np.abs(got - want).max() <= 1  # rounding ties only
    agree, kl, _ = compare(logits_of(full), logits_of(small))
    assert agree >= 0.9 and kl < 0.01, (agree, kl)
    # `nomoat doctor`'s estimate counts a quarter of the fp32 cache
    _, heads, length, dim = b.manifest.kv_shape
    saved = 2 * b.manifest.num_layers * heads * length * dim * 3 / 2**20
    assert abs(model_memory_mb(full, length) - model_memory_mb(small, length) - saved) < 0.1


def test_a_profiles_kv_cache_picks_the_exports_other_graph_bit_for_bit(exported, tmp_path, caplog):
    """Every float32 or int8 export carries the other cache's graph: kv_cache in a profile (or the user's config)
    switches without another export, and runs exactly what an export with that --kv-dtype runs."""
    from nomoat.edge.profile import Profile

    full, small = exported("fp32-base", precision="fp32"), exported("fp32-kv8", precision="fp32", kv_dtype="int8")
    for folder, other, graph in ((full, "int8", "model.kv-int8.onnx"), (small, "float32", "model.kv-float32.onnx")):
        kv = json.loads((folder / "nomoat.json").read_text())["kv_cache"]
        assert kv["variants"][other]["file"] == graph and graph in json.loads((folder / "nomoat.json").read_text())[
            "files"]
    cache = str(tmp_path / "graphs")
    for profile in (Profile(kv_cache="int8"), Profile(kv_cache="int8", optimized_model_cache=cache)):
        switched = Generator(full, profile)
        assert switched.model.kv_dtype == "int8" and {b.data_type() for b in switched.model.kv} == {"tensor(int8)"}
        np.testing.assert_array_equal(teacher_forced_logits(switched, IDS), logits_of(small))
    # the graph cache keeps the two apart: float32 again, from the same cache folder
    back = Generator(full, Profile(kv_cache="float32", optimized_model_cache=cache))
    np.testing.assert_array_equal(teacher_forced_logits(back, IDS), logits_of(full))
    np.testing.assert_array_equal(teacher_forced_logits(Generator(small, Profile(kv_cache="float32")), IDS),
                                  logits_of(full))
    # the adapters' model identity is the weights': the same whichever cache runs
    assert Generator(full, Profile(kv_cache="int8")).manifest.model_hash == Generator(full).manifest.model_hash
    # `nomoat doctor` counts the cache the profile gives
    length = Generator(full).manifest.max_length
    assert model_memory_mb(full, length, "int8") == model_memory_mb(small, length)
    assert model_memory_mb(small, length, "float32") == model_memory_mb(full, length)

    # a folder exported before the variants: its own cache, and a warning that says how to get the other
    old = tmp_path / "old"
    old.mkdir()
    for f in full.iterdir():
        if f.name not in ("model.kv-int8.onnx", "nomoat.json"):
            shutil.copy2(f, old / f.name)
    manifest = json.loads((full / "nomoat.json").read_text())
    del manifest["kv_cache"]["variants"]
    del manifest["files"]["model.kv-int8.onnx"]
    write_json(old / "nomoat.json", manifest)
    with caplog.at_level("WARNING", logger="nomoat.model"):
        kept = Generator(old, Profile(kv_cache="int8"))
    assert kept.model.kv_dtype == "float32" and "re-export it for kv_cache = 'int8'" in caplog.text
    np.testing.assert_array_equal(teacher_forced_logits(kept, IDS), logits_of(full))
    # a graph the manifest does not hash (here: outside the folder) is never loaded
    manifest["kv_cache"]["variants"] = {"int8": {"file": "../elsewhere.onnx"}}
    write_json(old / "nomoat.json", manifest)
    shutil.copy2(full / "model.kv-int8.onnx", tmp_path / "elsewhere.onnx")
    assert Generator(old, Profile(kv_cache="int8")).model.kv_dtype == "float32"
    # and a changed one fails the folder's check like any other file
    tampered = tmp_path / "tampered"
    shutil.copytree(full, tampered)
    with open(tampered / "model.kv-int8.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelError, match="model.kv-int8.onnx"):
        Generator(tampered, Profile(kv_cache="int8"))


def test_kv_cache_settings_are_checked(tmp_path):
    from nomoat.edge.config import settings
    from nomoat.edge.profile import ProfileError, profile_from_dict

    assert profile_from_dict({"kv_cache": "int8"}).kv_cache == "int8"
    with pytest.raises(ProfileError, match="kv_cache must be one of"):
        profile_from_dict({"kv_cache": "int4"})
    config = tmp_path / "nomoat.toml"
    config.write_text('kv_cache = "int8"\n')
    assert settings(config=str(config)).kv_cache == "int8"
    config.write_text('kv_cache = "fp8"\n')
    with pytest.raises(ProfileError, match="kv_cache must be one of"):
        settings(config=str(config))


def test_exact_fidelity_keeps_its_levels_under_any_profile(exported):
    from nomoat.edge.profile import Profile

    folder = exported("int4-exact", fidelity="exact")
    assert json.loads((folder / "nomoat.json").read_text())["quantization"]["fidelity"] == "exact"
    as_exported = teacher_forced_logits(Generator(folder), IDS)
    np.testing.assert_array_equal(teacher_forced_logits(Generator(folder, Profile(accuracy_level=4)), IDS), as_exported)
    # while a default export follows the profile
    default = exported("int4-tiny")
    assert not np.array_equal(teacher_forced_logits(Generator(default, Profile(accuracy_level=1)), IDS), logits_of(default))


def test_cli_min_agreement_is_enforced(tiny, tmp_path):
    from click.testing import CliRunner
    from nomoat.edge.cli import main

    args = ["export", str(tiny), "-o", str(tmp_path / "m"), "--max-length", "256", "--verify"]
    result = CliRunner().invoke(main, [*args, "--min-agreement", "1.01"])  # no int4 export reaches 101 %
    assert result.exit_code == 1 and "see --min-agreement" in result.output and not (tmp_path / "m").exists()
    assert CliRunner().invoke(main, [*args, "--min-agreement", "0"]).exit_code == 0
    verification = json.loads((tmp_path / "m" / "nomoat.json").read_text())["verification"]
    assert 0 <= verification["top1_agreement"] <= 1 and verification["tokens"] > 0
    table = CliRunner().invoke(main, ["bench", str(tmp_path / "m"), "--runs", "1", "--long-context", "16"]).output
    assert re.search(r"fidelity +top-1 agreement", table), table


def test_via_optimum_fp32_equals_transformers_and_int4_is_close(tiny, adapters, exported):
    fp32 = exported("optimum-fp32", precision="fp32", via="optimum")
    manifest = json.loads((fp32 / "nomoat.json").read_text())
    assert manifest["graph"]["kind"] == "optimum" and manifest["kv_cache"]["shared_buffer"] is False
    ref = reference_logits(load_reference(tiny), IDS)
    np.testing.assert_allclose(logits_of(fp32), ref, atol=1e-4, rtol=1e-4)
    agree, kl, _ = compare(ref, logits_of(exported("optimum-int4", via="optimum")))
    assert agree >= 0.5 and kl < 0.05, (agree, kl)
    # a merged adapter goes through the same path: equal to the builder's merged export
    merged = exported("optimum-merged", precision="fp32", via="optimum", loras=[(adapters[0], 1.0)])
    np.testing.assert_allclose(logits_of(merged), logits_of(exported("merged-a1", precision="fp32",
                                                                      loras=[(adapters[0], 1.0)])), atol=1e-4)
    # the generation loop runs it too
    assert len(Generator(fp32).generate("The capital", max_tokens=8).tokens) == 8


def test_via_optimum_gptq_calibrates_and_stays_close(tiny, exported):
    folder = exported("optimum-gptq", via="optimum", quant_method="gptq")
    assert json.loads((folder / "nomoat.json").read_text())["quantization"]["weights"] == {"gptq-int4": 15}
    _, kl, _ = compare(reference_logits(load_reference(tiny), IDS), logits_of(folder))
    assert kl < 0.1, kl


def test_via_optimum_refuses_lora_slots_and_builder_refuses_gptq(tiny, tmp_path):
    with pytest.raises(ExportError, match="keeps no LoRA slots"):
        export(tiny, tmp_path / "x", via="optimum", lora_rank=4)
    with pytest.raises(ExportError, match="kv-dtype float16 and int8 need the builder"):
        export(tiny, tmp_path / "x", via="optimum", kv_dtype="float16")
    with pytest.raises(ExportError, match="gptq needs --via optimum"):
        export(tiny, tmp_path / "x", quant_method="gptq")
    assert not (tmp_path / "x").exists()


def test_manifest_records_files_and_layout(exported):
    folder = exported("slots", lora_rank=8, precision="fp32")
    m = json.loads((folder / "nomoat.json").read_text())
    assert set(m["files"]) >= {"model.onnx", "model.onnx.data", "tokenizer.json", "tokenizer_config.json"}
    assert m["kv_cache"]["shape"] == [1, 2, 256, 16] and m["kv_cache"]["layout"] == "BNSH"
    assert m["lora"]["rank"] == 8 and {s["target"] for s in m["lora"]["slots"]} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert m["lora"]["slots"][0]["A"] == "lora.0.q_proj.A"
    assert len(m["model_hash"]) == 64 and m["eos_token_ids"] == [2]


def test_merged_lora_equals_peft_reference(tiny, adapters, exported):
    a1, a2 = adapters
    folder = exported("merged-both", precision="fp32", loras=[(a1, 1.0), (a2, 0.5)])
    ref = reference_logits(load_reference(tiny, [(a1, 1.0), (a2, 0.5)]), IDS)
    base = reference_logits(load_reference(tiny), IDS)
    assert np.abs(ref - base).max() > 1e-2  # the adapters matter
    np.testing.assert_allclose(logits_of(folder), ref, atol=1e-4, rtol=1e-4)


def test_slot_export_fed_adapter_equals_merged(adapters, exported):
    a1, _ = adapters
    slots = exported("slots", lora_rank=8, precision="fp32")
    merged = exported("merged-a1", precision="fp32", loras=[(a1, 1.0)])
    gen = Generator(slots)
    gen.adapters.add(Adapter("a1", {}, slot_tensors(load_adapter(a1))))
    np.testing.assert_allclose(teacher_forced_logits(gen, IDS, [("a1", 1.0)]), logits_of(merged), atol=1e-4, rtol=1e-4)
    # no adapter: exactly the base export
    np.testing.assert_array_equal(teacher_forced_logits(gen, IDS), logits_of(exported("fp32-base", precision="fp32")))


def test_missing_source(tmp_path):
    with pytest.raises(ExportError, match="not found"):
        export(tmp_path / "nope", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture(tmp_path):
    src = tmp_path / "gpt2"
    src.mkdir()
    write_json(src / "config.json", {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ExportError, match="unsupported architecture"):
        export(src, tmp_path / "out")
    assert not list(tmp_path.glob("*out*"))


def test_non_llama_gguf(tmp_path):
    import gguf

    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ExportError, match="unsupported GGUF architecture 'gpt2'"):
        export(path, tmp_path / "out")


def test_adapter_for_another_base(tiny, tmp_path):
    from conftest import make_adapter, make_llama

    big = make_llama(tmp_path / "big", layers=3)
    adapter = make_adapter(big, tmp_path / "a-big", seed=3)
    with pytest.raises(ExportError, match="targets model.layers.2"):
        export(tiny, tmp_path / "out", loras=[(adapter, 1.0)])
    assert not list(tmp_path.glob(".out*")) and not (tmp_path / "out").exists()


def test_failed_export_leaves_nothing(tiny, tmp_path):
    with pytest.raises(ExportError, match="multiple of --block-size 48"):
        export(tiny, tmp_path / "out", block_size=48)
    assert list(tmp_path.iterdir()) == []


def test_cli_export_reports_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "nomoat", "export", str(tmp_path / "missing"), "-o",
                        str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 1 and "error: source not found" in r.stderr


def test_cli_export_in_a_fresh_process_converts_the_tokenizer_apart(tiny, tmp_path):
    """Without transformers loaded, the tokenizer is converted in a child process (lower peak memory)."""
    r = subprocess.run([sys.executable, "-m", "nomoat", "export", str(tiny), "-o", str(tmp_path / "o"),
                        "--no-verify", "--max-length", "64"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert Generator(tmp_path / "o").generate("The capital", max_tokens=4).tokens
    assert json.loads((tmp_path / "o" / "tokenizer_config.json").read_text())["eos_token"] == "<|im_end|>"


@pytest.mark.slow
def test_q4_0_gguf_blocks_are_imported_exactly(smollm2_gguf, tmp_path):
    """A small random Q4_0 GGUF (untied Q8_0 output): every block kept as it is, and the int4 graph
    computes what the fp32 graph of the same dequantized weights computes."""
    from nomoat.export.builder import BuildOptions
    from nomoat.export.pipeline import export_model
    write_random_llama = load_tool("random_llama_gguf").write_random_llama

    gguf = tmp_path / "r.gguf"
    write_random_llama(str(gguf), str(smollm2_gguf), hidden=128, ffn=256, layers=2, heads=4, kv_heads=2)
    int4 = export_model(gguf, tmp_path / "int4", BuildOptions(max_length=64, accuracy_level=1), verify=False,
                        log=lambda *_: None)
    fp32 = export_model(gguf, tmp_path / "fp32", BuildOptions(max_length=64, precision="fp32"), verify=False,
                        log=lambda *_: None)
    kinds = json.loads((int4 / "nomoat.json").read_text())["quantization"]["weights"]
    assert kinds == {"gguf:Q4_0": 2 * 7 + 1, "gguf:Q8_0": 1}  # layers + embedding, output
    np.testing.assert_allclose(logits_of(int4), logits_of(fp32), atol=1e-3)
    # GGUF scales are fp16: the file keeps them so (2 bytes per block), the graph casts them back
    graph = onnx.load(int4 / "model.onnx", load_external_data=False).graph
    halves = [t for t in graph.initializer if t.name.endswith(".scales.f16")]
    assert len(halves) == 2 * 4 and all(t.data_type == onnx.TensorProto.FLOAT16 for t in halves)
    # the lm_head (untied, Q8_0; 49152 rows, so 4 chunks) reads its fp16 scales through views and Casts, too
    head_scales = [t for t in graph.initializer if t.name.startswith("lm_head.") and t.name.endswith(".scales")]
    assert len(head_scales) == 4 and all(t.data_type == onnx.TensorProto.FLOAT16 for t in head_scales)
    # the untied embedding keeps its own Q4_0 blocks, for the runtime's lookup alone (not in the graph)
    lookup = json.loads((int4 / "nomoat.json").read_text())["embedding"]
    assert lookup["bits"] == 4 and lookup["scales"]["dtype"] == "float16"
    assert not [t for t in graph.initializer if t.name.startswith("model.embed_tokens")]
    assert {n.output[0] for n in graph.node if n.op_type == "Cast"} >= {t.name[:-4] for t in halves}


def test_every_gguf_block_type_converts_value_for_value():
    """Each type's blocks, as MatMulNBits blocks, dequantize to what gguf's own `dequantize` gives, to fp32
    rounding (the offsets of types with a minimum are one fp32 sum); random bytes with sane fp16 scales are valid
    blocks of any type."""
    import gguf
    from nomoat.edge.gguf_blocks import EXACT_TYPES, gguf_blocks
    from nomoat.export.sources import QuantBlocks
    random_blocks = load_tool("random_llama_gguf").random_blocks

    rng = np.random.default_rng(0)
    for kind in EXACT_TYPES:
        qtype = gguf.GGMLQuantizationType[kind]
        raw = random_blocks(qtype, (16, 512), rng)
        b = gguf_blocks(kind, raw)
        assert b.bits in (4, 8)
        ref = gguf.quants.dequantize(raw, qtype).reshape(16, 512)
        ours = QuantBlocks(b.bits, b.block_size, b.packed, b.scales, None, b.mins).dequantize()
        np.testing.assert_allclose(ours, ref, rtol=0, atol=2 * np.finfo(np.float32).eps *
                                   np.abs(ref).max(), err_msg=kind)


@pytest.mark.slow
def test_a_gguf_of_every_block_type_exports_exactly(smollm2_gguf, tmp_path):
    """A random LLaMA whose weights cycle through every block type nomoat imports exactly: each is kept (the
    manifest says so per type), and at fp32 compute (level 1) the graph gives the logits of gguf's own
    dequantized weights exported as float."""
    import gguf
    from nomoat.edge.gguf_blocks import EXACT_TYPES
    from nomoat.export.builder import BuildOptions
    from nomoat.export.pipeline import export_model
    write_random_llama = load_tool("random_llama_gguf").write_random_llama

    names = iter(range(1000))
    types = lambda name: gguf.GGMLQuantizationType[EXACT_TYPES[next(names) % len(EXACT_TYPES)]]  # noqa: E731
    chosen = write_random_llama(str(tmp_path / "r.gguf"), str(smollm2_gguf), hidden=256, ffn=512, layers=2,
                                heads=4, kv_heads=2, qtypes=types, reference=str(tmp_path / "ref.gguf"))
    assert set(chosen.values()) == set(EXACT_TYPES)
    quiet = lambda *_: None  # noqa: E731
    exact = export_model(tmp_path / "r.gguf", tmp_path / "int", BuildOptions(max_length=64, accuracy_level=1),
                         verify=False, log=quiet)
    ref = export_model(tmp_path / "ref.gguf", tmp_path / "f32", BuildOptions(max_length=64, precision="fp32"),
                       verify=False, log=quiet)
    kinds = json.loads((exact / "nomoat.json").read_text())["quantization"]["weights"]
    assert set(kinds) == {f"gguf:{k}" for k in EXACT_TYPES}, kinds
    ours, theirs = logits_of(exact), logits_of(ref)
    np.testing.assert_allclose(ours, theirs, atol=1e-4 * np.abs(theirs).max())
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


COMPACT_CYCLE = ("Q5_0", "Q6_K", "Q4_K", "Q5_K", "Q3_K", "Q5_1", "IQ4_XS", "Q2_K", "IQ4_NL")


@pytest.fixture(scope="module", params=["untied", "tied"])
def compact_pair(request, smollm2_gguf, tmp_path_factory):
    """A random LLaMA GGUF whose weights cycle through the types a compact folder keeps as rows (a Q6_K token
    embedding with a Q5_K output, or a tied Q4_K one), exported compact (the default) and --no-compact."""
    import gguf
    from nomoat.export.builder import BuildOptions
    from nomoat.export.pipeline import export_model
    write_random_llama = load_tool("random_llama_gguf").write_random_llama

    tmp = tmp_path_factory.mktemp("compact")
    names = iter(range(1000))

    tied = request.param == "tied"
    heads = {"token_embd.weight": "Q4_K" if tied else "Q6_K", "output.weight": "Q5_K"}

    def types(name):
        return gguf.GGMLQuantizationType[heads.get(name) or COMPACT_CYCLE[next(names) % len(COMPACT_CYCLE)]]

    write_random_llama(str(tmp / "r.gguf"), str(smollm2_gguf), hidden=256, ffn=512, layers=2, heads=4, kv_heads=2,
                       qtypes=types, tied=tied)
    quiet = lambda *_: None  # noqa: E731
    return (export_model(tmp / "r.gguf", tmp / "compact", BuildOptions(max_length=64), verify=False, log=quiet),
            export_model(tmp / "r.gguf", tmp / "full", BuildOptions(max_length=64, compact=False), verify=False,
                         log=quiet))


def test_a_compact_folder_keeps_the_gguf_rows_and_runs_bit_for_bit_as_the_converted_one(compact_pair, tmp_path):
    """Weights whose MatMulNBits blocks are much larger than their GGUF rows stay rows in the folder; the runtime
    converts them at load (with and without the graph cache, whose later loads need no conversion), to the same
    logits, bit for bit, and leaves no scratch folder behind."""
    import tempfile

    from nomoat.edge.profile import Profile

    compact, full = compact_pair
    m, f = (json.loads((d / "nomoat.json").read_text()) for d in (compact, full))
    assert m["format_version"] == 3 and "expanded" not in f and f["format_version"] == 2
    spec = m["expanded"]
    kinds = {part[0] for w in spec["weights"] for part in w["parts"]}
    tied = m["config"]["tie_word_embeddings"]
    assert kinds == set(COMPACT_CYCLE) | {"Q4_K" if tied else "Q5_K"}, kinds  # the lm_head's chunks too
    assert m["embedding"]["gguf"]["type"] == ("Q4_K" if tied else "Q6_K")  # the token lookup reads the rows
    assert "gguf" not in f["embedding"]
    lm_head = {w["parts"][0][1] for w in spec["weights"] if w["outputs"]["packed"]["name"].startswith("lm_head")}
    assert (m["embedding"]["gguf"]["offset"] in lm_head) == tied  # tied: the lm_head reads the lookup's rows
    raw = sum(rows * row_bytes for w in spec["weights"] for _, _, rows, row_bytes in w["parts"])
    size = lambda d: (d / "model.onnx.data").stat().st_size  # noqa: E731
    slack = 4096 * sum(len(w["parts"]) + len(w["outputs"]) for w in spec["weights"])  # page alignment
    assert spec["bytes"] > 1.25 * raw  # what these types' blocks take, against their rows (Q4_K: 1.33x)
    assert size(full) - size(compact) >= spec["bytes"] - raw - slack

    scratch = lambda: set(Path(tempfile.gettempdir()).glob(".nomoat-expanded-*"))  # noqa: E731
    before = scratch()
    theirs = logits_of(full)
    assert np.array_equal(logits_of(compact), theirs)
    cache = tmp_path / "cache"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale, loading = cache / f".nomoat-expanded-{dead.pid}-x", cache / f".nomoat-expanded-{os.getpid()}-y"
    for d in (stale, loading):  # left by a process killed while loading, and one still loading
        d.mkdir(parents=True)
    for _ in range(2):  # the first load converts and writes the cache, the second reads the cache alone
        gen = Generator(compact, Profile(optimized_model_cache=str(cache)))
        assert np.array_equal(teacher_forced_logits(gen, IDS), theirs)
    assert list(cache.glob(".*")) == [loading] and scratch() <= before
    # a second session for prompts (its graph from memory, at another accuracy level) converts from the same scratch
    two = [Generator(d, Profile(prefill_accuracy_level=1, prefill_min_tokens=4)) for d in (compact, full)]
    assert two[0].model.prefill_session is not None
    assert np.array_equal(*(g.prefill(IDS) for g in two))


def test_a_compact_folder_loads_with_its_cache_on_another_filesystem(compact_pair):
    """No hard link across filesystems (nor, with fs.protected_hardlinks, to a file a service user does not own):
    the scratch folder copies the weights file instead."""
    import shutil
    import tempfile

    from nomoat.edge.profile import Profile

    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == compact_pair[0].stat().st_dev:
        pytest.skip("no tmpfs on another filesystem than the model folder")
    cache = Path(tempfile.mkdtemp(dir=shm))
    try:
        gen = Generator(compact_pair[0], Profile(optimized_model_cache=str(cache)))
        assert np.array_equal(teacher_forced_logits(gen, IDS), logits_of(compact_pair[1]))
        assert not list(cache.glob(".*"))
    finally:
        shutil.rmtree(cache)


def test_a_compact_recipe_that_does_not_give_the_exporters_bytes_is_refused(compact_pair, tmp_path):
    import shutil


    bad = tmp_path / "bad"
    shutil.copytree(compact_pair[0], bad)
    m = json.loads((bad / "nomoat.json").read_text())
    first, second = m["expanded"]["weights"][:2]
    first["parts"][0][1] = second["parts"][0][1]  # rows of another weight (the manifest is not in its own hashes)
    write_json(bad / "nomoat.json", m)
    with pytest.raises(ModelError, match="differ from the exporter's"):
        Generator(bad)


@pytest.mark.slow
def test_a_gguf_type_without_an_exact_layout_is_requantized_and_says_so(smollm2_gguf, tmp_path):
    import gguf
    from nomoat.export.builder import BuildOptions
    from nomoat.export.pipeline import export_model
    write_random_llama = load_tool("random_llama_gguf").write_random_llama

    q = gguf.GGMLQuantizationType
    write_random_llama(str(tmp_path / "r.gguf"), str(smollm2_gguf), hidden=256, ffn=512, layers=2, heads=4,
                       kv_heads=2, qtypes=lambda name: q.IQ2_XXS if name == "blk.0.ffn_down.weight" else q.Q4_K)
    lines = []
    out = export_model(tmp_path / "r.gguf", tmp_path / "o", BuildOptions(max_length=64), verify=False,
                       log=lines.append)
    assert "  weights: imported exactly: Q4_K × 15; re-quantized (no exact MatMulNBits layout): IQ2_XXS × 1; " \
           "rtn-int4 × 1" in lines, lines
    quant = json.loads((out / "nomoat.json").read_text())["quantization"]
    assert quant["weights"] == {"gguf:Q4_K": 15, "rtn-int4": 1} and quant["requantized_from"] == {"IQ2_XXS": 1}


def llama3_rope_factors(head_dim: int, theta: float, factor=8.0, lo=1.0, hi=4.0, old=8192) -> np.ndarray:
    """The rope_freqs tensor that llama.cpp's convert_hf_to_gguf.py writes for a llama3 rope_scaling."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    wavelen = 2 * np.pi / freqs
    smooth = (old / wavelen - lo) / (hi - lo)
    return np.where(wavelen < old / hi, 1.0, np.where(wavelen > old / lo, factor, 1 / ((1 - smooth) / factor + smooth)))


def test_a_gguf_rope_freqs_tensor_is_the_llama3_scaling_of_the_hf_config():
    from nomoat.export.builder import rotary_tables
    from nomoat.export.sources import LlamaConfig

    base = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_layers=1, num_heads=32, num_kv_heads=8,
                       head_dim=64, vocab_size=10, rope_theta=500000.0, rms_norm_eps=1e-5,
                       max_position_embeddings=131072, tie_word_embeddings=True, bos_token_id=None, eos_token_ids=())
    from dataclasses import replace

    hf = replace(base, rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    gguf = replace(base, rope_freq_factors=tuple(np.float32(llama3_rope_factors(64, 500000.0, factor=32.0))))
    for a, b in zip(rotary_tables(hf, 4096), rotary_tables(gguf, 4096), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)
    assert not np.allclose(rotary_tables(base, 4096)[0], rotary_tables(hf, 4096)[0], atol=1e-2)


@pytest.mark.slow
def test_a_llama3_style_gguf_exports_with_its_rope_freqs_and_names(smollm2_gguf, tmp_path):
    """A Llama 3.x-style GGUF on its own (no Hugging Face folder): rope_freqs is applied, the untied output
    kept, the BPE tokenizer and chat template come from the file, general.* names go to the manifest."""
    from nomoat.export.builder import BuildOptions
    from nomoat.export.pipeline import export_model
    write_random_llama = load_tool("random_llama_gguf").write_random_llama

    factors = llama3_rope_factors(64, 10000.0, factor=8.0, old=64)
    write_random_llama(str(tmp_path / "l3.gguf"), str(smollm2_gguf), hidden=256, ffn=512, layers=2, heads=4,
                       kv_heads=2, rope_freqs=factors)
    write_random_llama(str(tmp_path / "plain.gguf"), str(smollm2_gguf), hidden=256, ffn=512, layers=2, heads=4,
                       kv_heads=2)
    quiet = lambda *_: None  # noqa: E731
    l3 = export_model(tmp_path / "l3.gguf", tmp_path / "l3", BuildOptions(max_length=256), verify=False, log=quiet)
    plain = export_model(tmp_path / "plain.gguf", tmp_path / "p", BuildOptions(max_length=256), verify=False,
                         log=quiet)
    m = json.loads((l3 / "nomoat.json").read_text())
    np.testing.assert_allclose(m["config"]["rope_freq_factors"], factors, rtol=1e-6)
    assert m["source"]["general"]["name"] == "random-llama" and m["config"]["tie_word_embeddings"] is False
    ids = list(range(5, 105))  # far enough for the scaled low frequencies to matter
    assert not np.allclose(logits_of(l3, ids), logits_of(plain, ids), atol=1e-3)
    np.testing.assert_allclose(logits_of(l3, ids[:1]), logits_of(plain, ids[:1]), atol=1e-5)  # position 0: no rotation
    tok = json.loads((l3 / "tokenizer_config.json").read_text())
    assert tok.get("chat_template") and Generator(l3).generate([{"role": "user", "content": "hi"}], max_tokens=2)


@pytest.mark.slow
def test_smollm2_gguf_says_paris(smollm2_gguf, tmp_path):
    """The real model, imported from its GGUF blocks, verified against transformers."""
    from nomoat.export.builder import BuildOptions
    from nomoat.export.pipeline import export_model

    lines = []
    out = export_model(smollm2_gguf, tmp_path / "smol", BuildOptions(max_length=1024), verify=True,
                       log=lines.append)
    assert any("greedy export:    ' Paris" in line for line in lines), lines
    result = Generator(out).generate("The capital of France is", max_tokens=4)
    assert result.text.startswith(" Paris"), result.text

    # --fidelity exact: every teacher-forced token as the reference, and the reference's chat answer
    exact = export_model(smollm2_gguf, tmp_path / "exact", BuildOptions(max_length=1024, fidelity="exact"),
                         verify=True, log=lines.append, min_agreement=1.0)
    answer = Generator(exact).generate([{"role": "user", "content": "What is the capital of France?"}], max_tokens=8)
    assert answer.text.startswith("The capital of France is Paris"), answer.text

    # `nomoat doctor`: it fits a Raspberry Pi Zero 2 W at its profile's context, not a 100 MiB budget.
    from nomoat.edge.doctor import check
    from nomoat.edge.profile import Profile, load_profile
    from test_doctor import ZERO2, device

    zero = device(ZERO2, 427)
    assert not [msg for _, msg in check(load_profile("raspberry-pi-zero-2w"), zero, out) if "MiB" in msg]
    assert any("lower context_length" in msg for _, msg in check(Profile(memory_cap_mb=100), zero, out))


def llama_cpp_bin() -> Path | None:
    """llama.cpp's tools, built as the README says (NOMOAT_LLAMA_CPP or .cache/llamacpp/…/build/bin)."""
    import os

    found = [Path(os.environ["NOMOAT_LLAMA_CPP"])] if os.environ.get("NOMOAT_LLAMA_CPP") else []
    found += sorted((Path(__file__).resolve().parent.parent / ".cache" / "llamacpp").glob("*/vendor/llama.cpp/build/bin"))
    return next((p for p in found if (p / "llama-quantize").exists()), None)


@pytest.mark.slow
@pytest.mark.skipif(llama_cpp_bin() is None, reason="llama.cpp's llama-quantize is not built (tools/build_llama_cpp.sh: "
                    "~20 min on 2 cores, cached in .cache/llamacpp)")
def test_a_q4_k_m_file_made_by_llama_quantize_is_imported_exactly(smollm2_gguf, tmp_path):
    """The file users download most, made by llama.cpp's own tool: every weight imported exactly (nothing
    re-quantized), the fp32 path follows transformers' reading of the same file on every token."""
    from nomoat.export.builder import BuildOptions
    from nomoat.export.pipeline import export_model

    gguf = tmp_path / "smol.Q4_K_M.gguf"
    subprocess.run([str(llama_cpp_bin() / "llama-quantize"), "--allow-requantize", str(smollm2_gguf), str(gguf),
                    "Q4_K_M"], check=True, capture_output=True)
    lines: list[str] = []
    out = export_model(gguf, tmp_path / "exact", BuildOptions(max_length=256, fidelity="exact"), verify=True,
                       log=lines.append, min_agreement=1.0)
    quant = json.loads((out / "nomoat.json").read_text())["quantization"]
    assert "requantized_from" not in quant and "rtn-int4" not in quant["weights"], quant
    assert {"gguf:Q4_K", "gguf:Q6_K"} <= set(quant["weights"]), quant["weights"]
    # at default settings (an int8 lm_head, not exact's fp32 one) a compact folder is the file's size, not 1.38x
    default = export_model(gguf, tmp_path / "default", BuildOptions(max_length=256), verify=False, log=lines.append)
    folder = sum(f.stat().st_size for f in default.iterdir())
    assert folder <= 1.1 * gguf.stat().st_size, (folder, gguf.stat().st_size)
    assert any(line.startswith("  compact: ") for line in lines), lines
