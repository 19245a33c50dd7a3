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
from nomoat.export.packing import pack_adapter

pytestmark = [pytest.mark.arm64, pytest.mark.slow]
def _find_tools() -> Path:
    """NOMOAT_ARM64_TOOLS, else ../shared/tools/arm64 beside this checkout, else beside the checkout it was
    cloned from (a clean clone in /tmp for a CI rehearsal has no ../shared of its own)."""
    if os.environ.get("NOMOAT_ARM64_TOOLS"):
        return Path(os.environ["NOMOAT_ARM64_TOOLS"])
    candidates = [ROOT.parent / "shared" / "tools" / "arm64"]
    origin = subprocess.run(["git", "-C", str(ROOT), "config", "--get", "remote.origin.url"],
                            capture_output=True, text=True).stdout.strip()
    if origin and Path(origin).is_dir():
        candidates.append(Path(origin).resolve().parent / "shared" / "tools" / "arm64")
    return next((c for c in candidates if c.is_dir()), candidates[0])


TOOLS = _find_tools()
PROBE = Path(__file__).with_name("arm64_probe.py")
# int8 activations: x86 (AVX2/VNNI) and ARM (dotprod) quantize activations with different kernels, so the
# logits differ by a few hundredths (the shared tool's MatMulNBits check allows 0.056 on one layer).
INT8_LOGIT_TOLERANCE = 0.1


def _unavailable() -> str | None:
    if not (TOOLS / "setup-arm64-python.sh").exists():
        return f"no aarch64 emulation tools at {TOOLS}"
    if os.geteuid() != 0 and not shutil.which("sudo"):
        return "setting up the aarch64 environment needs root (apt-get qemu-user-static)"
    return None


@pytest.fixture(scope="module")
def arm64(tmp_path_factory) -> Path:
    """An aarch64 Python with nomoat's wheel and the aarch64 wheels of its dependencies; returns its launcher."""
    reason = _unavailable()
    if reason:
        if os.environ.get("NOMOAT_REQUIRE_ARM64"):
            pytest.fail(reason)
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("arm64")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(root / "dist"), str(ROOT)], check=True)
    wheel = next((root / "dist").glob("nomoat-*.whl"))
    env = dict(os.environ, ARM64_EXTRA_WHEELS=str(wheel), ARM64_HOST_PYTHON=sys.executable)
    cmd = ["bash", str(TOOLS / "setup-arm64-python.sh"), str(root / "env")]
    if os.geteuid() != 0:
        cmd = ["sudo", "--preserve-env=ARM64_EXTRA_WHEELS,ARM64_HOST_PYTHON", *cmd]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    # A dependency of the device side without an aarch64 wheel fails here, in pip download.
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root / "env" / "run-arm64.sh"


@pytest.fixture(scope="module")
def models(tiny, adapters, smollm2_gguf, tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("arm64-models")
    int4 = export(tiny, root / "int4")  # accuracy level 4 recorded; the probe runs levels 1 and 4
    slots = export(tiny, root / "int4-slots", lora_rank=8)
    pack_adapter(adapters[0], slots, root / "a1.onnx_adapter")
    kv16 = export(tiny, root / "int4-kv16", kv_dtype="float16")
    # a GGUF import, as a Pi user makes one: Q4_0 blocks kept, fp16 block scales cast in the graph
    sys.path.insert(0, str(ROOT / "tools"))
    from random_llama_gguf import write_random_llama

    write_random_llama(str(root / "r.gguf"), str(smollm2_gguf), hidden=128, ffn=256, layers=2, heads=4, kv_heads=2)
    gguf = export(root / "r.gguf", root / "gguf", max_length=64)
    kv8 = export(tiny, root / "int4-kv8", kv_dtype="int8")
    return [str(int4), str(slots), str(root / "a1.onnx_adapter"), str(kv16), str(gguf), str(kv8)]


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
