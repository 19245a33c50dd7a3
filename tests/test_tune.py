"""`nomoat tune` on the tiny random LLaMA: a task it cannot do is learned, packed, pushed over a real Mosquitto to a
running device, and switched off again; training is reproducible; chat data trains the assistant turns only."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import export, mosquitto_path
from nomoat.edge.cli import main
from nomoat.edge.generate import Generator
from nomoat.export.packing import pack_adapter
from nomoat.export.sources import ExportError
from nomoat.export.tune import IGNORE, TuneOptions, encode, to_example, tune
from safetensors.numpy import load_file

WORDS = "The capital of France is Paris quick brown fox jumps over the lazy dog".split()
FAST = ["--lr", "1e-2", "--epochs", "5", "--quiet"]  # the tiny model learns a fixed answer in ~35 steps


def synthetic(path: Path, lead: str, answer: str, seed: int = 0, n: int = 60) -> Path:
    """Prompts "LEAD w1 w2 …" of random words, all answered with the same text: a task a random model cannot do."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            prompt = f"{lead} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))
            f.write(json.dumps({"prompt": prompt, "completion": answer}) + "\n")
    return path


def answer(gen: Generator, prompt: str, adapters=()) -> str:
    return gen.tokenizer.decode(gen.generate(gen.tokenizer.encode(prompt), max_tokens=6, adapters=adapters).tokens)


def quick(base, data, out, model=None, preserve=None, **kw) -> dict:
    opts = TuneOptions(**{"learning_rate": 1e-2, "epochs": 5, "rank": 4, "alpha": 8, **kw})
    return tune(base, data, out, opts, model, force=True, log=lambda *_: None, progress=False, preserve=preserve)


@pytest.mark.mqtt
@pytest.mark.skipif(not mosquitto_path(), reason="mosquitto is not installed")
def test_tune_push_serve_then_switch_off(tiny, slots, broker, key, tmp_path):
    from test_fleet import Events, ask, start_device

    key_path, pub = key
    data = synthetic(tmp_path / "code.jsonl", "code:", " 東京")
    ev = Events(broker)
    device = start_device(broker, slots, "d1", tmp_path / "store", pub)
    try:
        base_answer = ask(broker, "d1", prompt="code: lazy fox")["text"]
        assert base_answer != " 東京"
        push = ["--push", "--for", str(slots), "--key", str(key_path), "--fleet", "f", "--broker", broker.url,
                "--activate", "--wait-for", "1", "--timeout", "30", "--dtype", "float16"]
        result = CliRunner().invoke(main, ["tune", str(tiny), "--data", str(data), "-o", str(tmp_path / "code"),
                                           *FAST, *push])
        assert result.exit_code == 0, result.output
        assert "pushed code v1" in result.output and "activated" in result.output
        report = json.loads((tmp_path / "code" / "tune_report.json").read_text())
        assert report["held_out_loss"]["after"] < report["held_out_loss"]["before"] / 4
        assert ask(broker, "d1", prompt="code: lazy fox")["text"] == " 東京"  # the device's default now
        off = ask(broker, "d1", [{"name": "code", "scale": 0.0}], "code: lazy fox")
        assert off["text"] == base_answer

        # retrained on a new answer and pushed again: the next version is found on the broker
        synthetic(data, "code:", " café")
        result = CliRunner().invoke(main, ["tune", str(tiny), "--data", str(data), "-o", str(tmp_path / "code"),
                                           "--force", *FAST, *push])
        assert result.exit_code == 0, result.output
        assert "pushed code v2" in result.output
        assert ask(broker, "d1", prompt="code: lazy fox")["text"] == " café"

        result = CliRunner().invoke(main, ["fleet", "remove", "code", "--fleet", "f", "--broker", broker.url,
                                           "--key", str(key_path)])
        assert result.exit_code == 0, result.output
        ev.wait("removed", "d1")
        assert ask(broker, "d1", prompt="code: lazy fox")["text"] == base_answer
    finally:
        device.stop()
        ev.close()


def test_two_adapters_trained_apart_work_stacked(tiny, slots, tmp_path):
    gen = Generator(slots)
    for name, lead, text in (("a", "code:", " 東京"), ("b", "dog:", " café")):
        quick(tiny, synthetic(tmp_path / f"{name}.jsonl", lead, text, seed=len(name + lead)), tmp_path / name, slots)
        pack_adapter(tmp_path / name, slots, tmp_path / f"{name}.onnx_adapter", name=name)
        gen.load_adapter(tmp_path / f"{name}.onnx_adapter", name)
    both = (("a", 1.0), ("b", 1.0))  # rank 4 + 4 in the model's rank-8 slots
    assert answer(gen, "code: lazy fox") != " 東京" and answer(gen, "dog: over") != " café"
    assert answer(gen, "code: lazy fox", (("b", 1.0),)) != " 東京"
    assert answer(gen, "dog: over", (("a", 1.0),)) != " café"
    for prompt, want in (("code: lazy fox", " 東京"), ("code: Paris", " 東京"), ("dog: over", " café"),
                         ("dog: the quick", " café")):
        assert answer(gen, prompt, both) == want, prompt
    # the same PEFT folder merged into the weights by `nomoat export --lora`
    merged = Generator(export(tiny, tmp_path / "merged", loras=[(tmp_path / "a", 1.0)], precision="fp32"))
    assert answer(merged, "code: lazy fox") == " 東京"


def drift(base: Path, adapter: Path, prompts: list[str], gen: Generator) -> float:
    """Mean KL divergence from the base's next-token distribution to the adapted model's after each prompt."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    total = 0.0
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([gen.tokenizer.encode(p)])
            with model.disable_adapter():
                base_logp = torch.log_softmax(model(ids).logits[0, -1], -1)
            logp = torch.log_softmax(model(ids).logits[0, -1], -1)
            total += float((base_logp.exp() * (base_logp - logp)).sum())
    return total / len(prompts)


def test_preserve_holds_the_base_outside_the_adapters_task(tiny, slots, tmp_path):
    """--preserve: prompts of another pattern, answered by the base, on which each training step holds the adapted
    model to the base's distributions. The adapter still learns its task; on new prompts of the preserved pattern
    it moves the base's next-token distribution far less than the same training without --preserve."""
    gen = Generator(slots)
    data = synthetic(tmp_path / "code.jsonl", "code:", " 東京")
    keep = synthetic(tmp_path / "dog.jsonl", "dog:", "(ignored)", seed=7)
    unseen = [f"dog: {w} {v}" for w in WORDS[:6] for v in WORDS[6:10]]
    moved = {}
    for name, extra in (("plain", {}), ("kept", {"preserve": keep})):
        report = quick(tiny, data, tmp_path / name, slots, preserve_tokens=6, **extra)
        pack_adapter(tmp_path / name, slots, tmp_path / f"{name}.onnx_adapter", name=name)
        gen.load_adapter(tmp_path / f"{name}.onnx_adapter", name)
        assert answer(gen, "code: lazy fox", ((name, 1.0),)) == " 東京"
        moved[name] = drift(tiny, tmp_path / name, unseen, gen)
    assert report["preserve"]["prompts"] == 60 and report["preserve"]["drift_last10"] < 0.1
    assert moved["kept"] < moved["plain"] / 5, moved


def test_same_seed_same_adapter_and_the_files_peft_reads(tiny, tmp_path):
    data = synthetic(tmp_path / "d.jsonl", "code:", " 東京")
    r1 = quick(tiny, data, tmp_path / "a", steps=8)
    r2 = quick(tiny, data, tmp_path / "b", steps=8)
    r3 = quick(tiny, data, tmp_path / "c", steps=8, seed=1)
    w1, w2, w3 = (load_file(str(tmp_path / n / "adapter_model.safetensors")) for n in "abc")
    assert sorted(w1) == sorted(w2) and all((w1[k] == w2[k]).all() for k in w1)
    assert r1["held_out_loss"] == r2["held_out_loss"]
    assert any((w1[k] != w3[k]).any() for k in w1) and r3["held_out_loss"] != r1["held_out_loss"]
    # a normal PEFT folder: PEFT loads it onto the base
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny), str(tmp_path / "a"))
    assert sum("lora_A" in n for n, _ in model.named_parameters()) == 2 * 4  # 2 layers x q,k,v,o


def test_chat_examples_train_the_assistant_turns_only(tiny, slots, tmp_path):
    gen = Generator(slots)
    tok = gen.tokenizer
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The capital?"},
            {"role": "assistant", "content": "Paris"}, {"role": "user", "content": "Of France?"},
            {"role": "assistant", "content": "Yes, France."}]
    enc, cut = encode(to_example({"messages": msgs}, tok), tok, gen.manifest.eos_token_ids[0], 512)
    assert not cut
    trained = [i for i, label in zip(enc.ids, enc.labels, strict=True) if label != IGNORE]
    assert tok.tok.decode(trained, skip_special_tokens=False) == "Paris<|im_end|>\nYes, France.<|im_end|>\n"
    # what precedes the first answer is token for token what the device sends the model for that question
    first = enc.labels.index(next(x for x in enc.labels if x != IGNORE))
    assert enc.ids[:first] == tok.encode(tok.chat(msgs[:2], True), add_special_tokens=False)


def test_prompt_completion_learns_to_stop(tiny, slots):
    gen = Generator(slots)
    tok, eos = gen.tokenizer, gen.manifest.eos_token_ids[0]
    enc, _ = encode(to_example({"prompt": "code: fox", "completion": " 東京"}, tok), tok, eos, 512)
    n = len(tok.encode("code: fox"))
    assert enc.ids[:n] == tok.encode("code: fox") and set(enc.labels[:n]) == {IGNORE}
    assert enc.labels[n:] == enc.ids[n:] and enc.ids[-1] == eos


@pytest.mark.parametrize("lines, message", [
    (['{"prompt": "a", "completion": "b"}', "{not json"], "d.jsonl:2: not JSON"),
    (['{"messages": [{"role": "user", "content": "hi"}]}'], "d.jsonl:1: no assistant message"),
    (['{"prompt": "a"}'], "d.jsonl:1: expected \"prompt\" and \"completion\""),
    (['{"messages": [{"role": "user"}]}'], "d.jsonl:1: messages must be"),
    (["", "  "], "holds no examples"),
])
def test_bad_data_named_by_line(tiny, tmp_path, lines, message):
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ExportError, match=message):
        quick(tiny, tmp_path / "d.jsonl", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("lines, message", [
    (['{"prompt": "a"}', "[1]"], "p.jsonl:2: expected a \"prompt\" string or \"messages\""),
    (['{"messages": [{"role": "assistant", "content": "hi"}]}'], "p.jsonl:1: no message before"),
    (['{"prompt": ""}'], "p.jsonl:1: expected"),
    ([""], "holds no prompts"),
    (None, "preserve file not found"),
])
def test_bad_preserve_prompts_named_by_line(tiny, tmp_path, lines, message):
    data = synthetic(tmp_path / "d.jsonl", "code:", " x", n=12)
    if lines is not None:
        (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ExportError, match=message):
        quick(tiny, data, tmp_path / "out", preserve=tmp_path / "p.jsonl")
    assert not (tmp_path / "out").exists()


def test_adapter_must_fit_the_device_model(tiny, tiny_tied, slots, exported, tmp_path):
    data = synthetic(tmp_path / "d.jsonl", "code:", " 東京")
    with pytest.raises(ExportError, match="exceeds .* slot rank 8"):
        quick(tiny, data, tmp_path / "o", slots, rank=16)
    with pytest.raises(ExportError, match="no LoRA slots for gate_proj"):
        quick(tiny, data, tmp_path / "o", slots, targets=("q_proj", "gate_proj"))
    other = export(tiny_tied, tmp_path / "other", lora_rank=8, precision="fp32")
    with pytest.raises(ExportError, match="was exported from .*, not from"):
        quick(tiny, data, tmp_path / "o", other)
    with pytest.raises(ExportError, match="without LoRA slots"):
        quick(tiny, data, tmp_path / "o", exported("plain", precision="fp32"))
    result = CliRunner().invoke(main, ["tune", str(tiny), "--data", str(data), "-o", str(tmp_path / "o"), "--push"])
    assert result.exit_code == 1 and "--push needs --for" in result.output


@pytest.mark.slow
def test_gguf_base_trains_for_its_int4_export(smollm2_gguf, tmp_path):
    """BASE as the GGUF file the device model came from: transformers dequantizes it for training, and the
    adapter works on the int4 export of that file (its own Q4_0 blocks)."""
    from conftest import load_tool

    gguf = tmp_path / "r.gguf"
    load_tool("random_llama_gguf").write_random_llama(str(gguf), str(smollm2_gguf), hidden=128, ffn=256, layers=2,
                                                      heads=4, kv_heads=2)
    device_model = export(gguf, tmp_path / "int4", lora_rank=8, accuracy_level=1)
    report = quick(gguf, synthetic(tmp_path / "d.jsonl", "code:", " Tokyo"), tmp_path / "ad", device_model, rank=8)
    # a random lm_head of 128 columns keeps the logits flat: the loss falls from 10.6 to 8.3 while the
    # right token becomes the top one
    assert report["held_out_loss"]["after"] < report["held_out_loss"]["before"] - 1
    pack_adapter(tmp_path / "ad", device_model, tmp_path / "ad.onnx_adapter", name="ad")
    gen = Generator(device_model)
    gen.load_adapter(tmp_path / "ad.onnx_adapter", "ad")
    assert answer(gen, "code: lazy fox") != " Tokyo"
    assert answer(gen, "code: lazy fox", (("ad", 1.0),)) == " Tokyo"


@pytest.mark.mqtt
@pytest.mark.skipif(not mosquitto_path(), reason="mosquitto is not installed")
def test_next_version_ignores_forged_statuses(broker):
    """Anyone on the broker can publish a retained "status": a version no device would accept (out of range, not
    an integer) must not become the next push's version, nor crash it."""
    import subprocess

    from nomoat.edge.client import next_version
    from nomoat.edge.profile import MqttSettings

    forged = {"e1": {"installed": {"code": 10**26}, "last_push": {"name": "code", "version": "x"}},
              "e2": {"installed": {"code": True}, "name": "code", "version": 2**53},
              "e3": {"installed": {"code": 4}}, "e4": [1, 2], "e5": 7,
              "e6": {"installed": [1], "last_push": "x", "device": 5, "state": None, "model_hash": 3}}
    for device, status in forged.items():
        subprocess.run(["mosquitto_pub", "-p", str(broker.port), "-V", "mqttv311", "-q", "1", "-r",
                        "-t", f"nomoat/f/{device}/status", "-m", json.dumps(status)], check=True)
    assert next_version(MqttSettings(broker=broker.url, fleet="f"), "code", 1.0) == 5
    result = CliRunner().invoke(main, ["fleet", "status", "--fleet", "f", "--broker", broker.url, "--wait", "1"])
    assert result.exit_code == 0 and "code@v4" in result.output, result.output


def test_cli_preserve_reports_agreement_with_the_base(tiny, tmp_path):
    data = synthetic(tmp_path / "d.jsonl", "code:", " x", n=12)
    keep = synthetic(tmp_path / "k.jsonl", "dog:", "(ignored)", n=12, seed=3)
    out = CliRunner().invoke(main, ["tune", str(tiny), "--data", str(data), "-o", str(tmp_path / "a"), "--steps", "2",
                                    "--preserve", str(keep), "--preserve-tokens", "4", "--quiet"])
    assert out.exit_code == 0, out.output
    assert "the adapted model picks the base's token" in out.output
    report = json.loads((tmp_path / "a" / "tune_report.json").read_text())
    assert report["preserve"]["prompts"] == 12 and 0 <= report["preserve"]["kept"] <= 1
