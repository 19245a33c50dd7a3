"""The edge runtime on aarch64: the project's wheel on the official aarch64 CPython/onnxruntime wheels, under QEMU.

Uses ../shared/tools/arm64 (present on developers' machines and in CI; needs root for apt-get). The models are
exported on the host; tests/arm64_probe.py runs on the host and on emulated Raspberry Pi 4 and 5 CPUs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, export
from nomoat.edge.profile import load_profile
from nomoat.export.packing import pack_adapter

pytestmark = [pytest.mark.arm64, pytest.mark.slow]
PROBE = Path(__file__).with_name("arm64_probe.py")
# int8 activations: x86 (AVX2/VNNI) and ARM (dotprod) quantize activations with different kernels, so the
# logits differ by a few hundredths (the shared tool's MatMulNBits check allows 0.056 on one layer).
INT8_LOGIT_TOLERANCE = 0.1


@pytest.fixture(scope="module")
def models(tiny, adapters, smollm2_gguf, tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("arm64-models")
    int4 = export(tiny, root / "int4")  # accuracy level 4 recorded; the probe runs levels 1 and 4
    slots = export(tiny, root / "int4-slots", lora_rank=8)
    pack_adapter(adapters[0], slots, root / "a1.onnx_adapter")
    kv16 = export(tiny, root / "int4-kv16", kv_dtype="float16")
    # a GGUF import, as a Pi user makes one: Q4_0 blocks kept, fp16 block scales cast in the graph
    sys.path.insert(0, str(ROOT / "tools"))
    from gguf import GGMLQuantizationType
    from random_llama_gguf import write_random_llama

    write_random_llama(str(root / "r.gguf"), str(smollm2_gguf), hidden=128, ffn=256, layers=2, heads=4, kv_heads=2)
    gguf = export(root / "r.gguf", root / "gguf", max_length=64)
    kv8 = export(tiny, root / "int4-kv8", kv_dtype="int8")
    # the mix of a llama-quantize Q4_K_M file (Q5_0, Q4_K, Q6_K; a tied Q6_K embedding): a compact folder
    mix = iter(range(1000))
    write_random_llama(str(root / "k.gguf"), str(smollm2_gguf), hidden=256, ffn=512, layers=2, heads=4, kv_heads=2,
                       tied=True, qtypes=lambda name: GGMLQuantizationType.Q6_K if name == "token_embd.weight"
                       else GGMLQuantizationType[("Q5_0", "Q4_K", "Q6_K")[next(mix) % 3]])
    compact = export(root / "k.gguf", root / "compact", max_length=64)
    assert json.loads((compact / "nomoat.json").read_text())["expanded"]
    return [str(int4), str(slots), str(root / "a1.onnx_adapter"), str(kv16), str(gguf), str(kv8), str(compact)]


def probe(cmd: list[str], models: list[str], cwd: Path, env: dict | None = None) -> dict:
    # Run from a folder outside the checkout so that only the installed `nomoat` can be imported.
    script = cwd / PROBE.name
    shutil.copy(PROBE, script)
    done = subprocess.run([*cmd, str(script), *models], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def host(models, tmp_path_factory) -> dict:
    return probe([sys.executable], models, tmp_path_factory.mktemp("host"))


@pytest.mark.parametrize("cpu,dotprod,board", [("cortex-a72", False, "raspberry-pi-4"),
                                               ("cortex-a76", True, "raspberry-pi-5")])
def test_runtime_on_aarch64_matches_x86(arm64, models, host, cpu, dotprod, board, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    arm = probe([str(arm64)], models, tmp_path, dict(env, ARM64_CPU=cpu))
    assert arm["machine"] == "aarch64"
    # `nomoat doctor` there: the profiles ship in the wheel, and the board's own profile fits best.
    assert arm["fitting_profiles"][0] == board, arm["cpu"]

    # fp32 compute path (accuracy level 1): the same tokens as x86, logits equal to float rounding.
    assert arm["acc1_tokens"] == host["acc1_tokens"]
    np.testing.assert_allclose(arm["acc1_logits"], host["acc1_logits"], atol=1e-4)

    # Level 4: without dot-product instructions (Pi 4) onnxruntime falls back to the fp32 path.
    acc4 = np.array(arm["acc4_logits"])
    if dotprod:
        diff = np.abs(acc4 - host["acc4_logits"]).max()
        print(f"{cpu} int8 path: max|Δlogit| vs x86 = {diff:.4f}")
        assert diff <= INT8_LOGIT_TOLERANCE
        assert acc4.argmax() == np.argmax(host["acc4_logits"])
    else:
        np.testing.assert_allclose(acc4, arm["acc1_logits"], atol=1e-4)

    # Hot-swapped adapter: changes the output exactly as on x86; switching it off restores the base.
    assert arm["adapter"] == host["adapter"] != host["base"]
    assert arm["base"] == arm["off"] == host["base"]

    # fp16 KV cache and chunked prefill: the x86 tokens
    assert arm["kv16"] == host["kv16"]

    # the GGUF import (fp16 scales folded at load) on the fp32 path: the x86 tokens and logits
    assert arm["gguf_tokens"] == host["gguf_tokens"]
    assert arm["followup"] == host["followup"] and arm["followup"]["cached"] >= len(host["gguf_tokens"])
    np.testing.assert_allclose(arm["gguf_logits"], host["gguf_logits"], atol=1e-4)

    # the int8 KV cache: the x86 tokens; logits equal but for a rounding tie flipping one cached step
    assert arm["kv8_tokens"] == host["kv8_tokens"]
    np.testing.assert_allclose(arm["kv8_logits"], host["kv8_logits"], atol=1e-2)

    # the compact folder: converted on aarch64 to the exporter's bytes (or it would not load), the x86 logits
    host_compact = np.array(host["compact_logits"])
    np.testing.assert_allclose(arm["compact_logits"], host_compact, atol=1e-4 * np.abs(host_compact).max())

    # a draft model on the shared thread pool: the plain tokens, the same drafts taken as on x86
    assert arm["drafted"] == host["drafted"] and arm["drafted"]["tokens"] == arm["acc1_tokens"]
    assert 0 < arm["drafted"]["accepted"] <= arm["drafted"]["drafted"]


# Each board's profile on its own (emulated) CPU: the SmolLM2 export's teacher-forced top-1 agreement with the
# fp32 reference, measured by `nomoat doctor --model` there. The figures are the README's "Fidelity per CPU".
# The Zero 2 W's Cortex-A53 runs the Pi 4's kernel path (no dot-product: fp32, level 1), with its profile's int8 KV
# cache: the export's other graph, loaded there.
BOARDS = [("cortex-a76", "raspberry-pi-5", {}, 4, 0.90),
          ("cortex-a76", "android-termux", {"TERMUX_VERSION": "0.118.0"}, 4, 0.90),
          ("cortex-a72", "raspberry-pi-4", {}, 1, 0.99),
          ("cortex-a53", "raspberry-pi-zero-2w", {}, 1, 0.95)]


@pytest.mark.parametrize("cpu,profile,extra,level,floor", BOARDS, ids=[b[1] for b in BOARDS])
def test_doctor_measures_each_boards_fidelity_on_its_cpu(arm64, smollm2_verified, cpu, profile, extra, level, floor,
                                                         tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([str(arm64), "-m", "nomoat", "doctor", "--model", str(smollm2_verified), "--profile",
                           profile, "--json"], cwd=tmp_path, env=dict(env, ARM64_CPU=cpu, **extra),
                          capture_output=True, text=True, timeout=900)
    report = json.loads(done.stdout)
    assert not any(p["fatal"] for p in report["problems"]), report["problems"]
    f = report["fidelity"]
    print(f"{profile} on {cpu}: {f['top1_agreement']:.1%} top-1 agreement (level {f['accuracy_level']}, {f['kv_cache']} KV, "
          f"{f['tokens']} tokens; {f['at_export']['top1_agreement']:.1%} at export on {f['at_export']['measured_on']})")
    assert f["tokens"] == 76 and f["accuracy_level"] == level
    assert f["kv_cache"] == (load_profile(profile).kv_cache or "float32")
    assert f["top1_agreement"] >= floor
    if level == 1:  # the fp32 path follows the reference wherever it runs
        assert f["top1_agreement"] >= f["at_export"]["top1_agreement"]
