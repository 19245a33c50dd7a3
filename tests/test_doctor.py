"""`nomoat doctor`: device facts from real /proc files, the profile that fits, and what a profile lacks."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from nomoat.edge.cli import main
from nomoat.edge.doctor import Device, check, fitting_profiles, inspect_device, parse_cpuinfo, parse_meminfo
from nomoat.edge.profile import Profile, load_profile


def arm_cpuinfo(part: str, features: str, cores: int = 4, model: str = "") -> str:
    core = (f"BogoMIPS\t: 108.00\nFeatures\t: {features}\nCPU implementer\t: 0x41\nCPU architecture: 8\n"
            f"CPU variant\t: 0x0\nCPU part\t: {part}\nCPU revision\t: 3\n\n")
    return "".join(f"processor\t: {i}\n{core}" for i in range(cores)) + f"Model\t\t: {model}\n"


PI4 = arm_cpuinfo("0xd08", "fp asimd evtstrm crc32 cpuid", model="Raspberry Pi 4 Model B Rev 1.4")
PI5 = arm_cpuinfo("0xd0b", "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm "
                           "lrcpc dcpop asimddp", model="Raspberry Pi 5 Model B Rev 1.0")
ZERO2 = arm_cpuinfo("0xd03", "fp asimd evtstrm crc32 cpuid", model="Raspberry Pi Zero 2 W Rev 1.0")
PIXEL6 = arm_cpuinfo("0xd05", "fp asimd asimdhp asimddp", cores=4) + arm_cpuinfo("0xd41", "fp asimd asimdhp asimddp", 2)


def device(cpuinfo: str, memory_mb: int, android: bool = False) -> Device:
    cpu, features = parse_cpuinfo(cpuinfo)
    return Device("aarch64", cpu, 4, features, memory_mb, memory_mb - 200, android,
                  providers=["CPUExecutionProvider"])


def test_parse_cpuinfo_names_arm_cores_and_features():
    cpu, features = parse_cpuinfo(PI5)
    assert cpu == "4x Cortex-A76" and "asimddp" in features
    cpu, features = parse_cpuinfo(PI4)
    assert cpu == "4x Cortex-A72" and "asimddp" not in features
    assert parse_cpuinfo(PIXEL6)[0] == "4x Cortex-A55 + 2x Cortex-A78"
    assert parse_meminfo("MemTotal:        3884136 kB\nMemFree: 1 kB\nMemAvailable:    3000000 kB\n") == (3793, 2929)


@pytest.mark.parametrize("cpuinfo,memory,android,best", [
    (PI4, 3792, False, "raspberry-pi-4"),
    (PI5, 7940, False, "raspberry-pi-5"),
    (ZERO2, 427, False, "raspberry-pi-zero-2w"),
    (PIXEL6, 7600, True, "android-termux"),
])
def test_the_matching_profile_fits_best(cpuinfo, memory, android, best):
    assert fitting_profiles(device(cpuinfo, memory, android))[0] == best


def test_cores_and_memory_choose_the_profile_and_its_context():
    """A Cortex-A53 (Zero 2 W, Pi 3) got the Pi 4 profile when memory allowed (under QEMU, or a 1 GB Pi 3 before the
    Zero 2 W profile); a 2 GB Pi 5 got the Pi 4 profile (no dot-product kernels) because the Pi 5 profile's memory
    cap disqualified it."""
    from nomoat.edge.doctor import fitting_context

    assert fitting_profiles(device(ZERO2, 24000))[0] == "raspberry-pi-zero-2w"
    assert fitting_profiles(device(ZERO2, 906))[0] == "raspberry-pi-zero-2w"  # a Pi 3
    pi5_2gb = device(PI5, 1940)
    assert fitting_profiles(pi5_2gb)[0] == "raspberry-pi-5"
    problems = check(load_profile("raspberry-pi-5"), pi5_2gb)
    assert not any(fatal for fatal, _ in problems) and any("context 2048 instead of 4096" in m for _, m in problems)
    assert fitting_context(load_profile("raspberry-pi-5"), pi5_2gb) == 2048
    assert fitting_context(load_profile("raspberry-pi-5"), device(PI5, 7940)) == 4096
    assert fitting_profiles(device(PI4, 1900))[0] == "raspberry-pi-4"


def test_the_memory_estimate_is_the_measured_peak_model(exported):
    """Weights × 1.25 + KV cache + 130 MiB of runtime: fitted to `nomoat serve`'s measured peaks (README, Memory)."""
    from nomoat.edge.doctor import kv_cache_mb, model_memory_mb

    folder = exported("fp32-base", precision="fp32")
    weights = sum(p.stat().st_size for p in folder.glob("model.onnx*")) / 2**20
    assert abs(model_memory_mb(folder, 256) - (weights * 1.25 + kv_cache_mb(folder, 256) + 130)) < 0.1
    # SmolLM2-135M at context 2048 (105 MB of weights, 30 layers, 3 kv heads of 64, fp32 KV): ~355 MiB, against
    # 303-320 MiB measured; a 1.1B Q4_0 LLaMA (709 MB, 22 layers, 4 × 64): ~1148 MiB against 1065-1270
    assert 340 < 100.2 * 1.25 + 2 * 30 * 3 * 2048 * 64 * 4 / 2**20 + 130 < 370


def test_problems_of_a_profile_on_the_wrong_device():
    pi4 = device(PI4, 3792)
    problems = check(load_profile("raspberry-pi-5"), pi4)
    assert any(fatal and "asimddp" in msg for fatal, msg in problems)
    problems = check(Profile(accuracy_level=4, threads=8, providers=load_profile("android-termux").providers), pi4)
    messages = " | ".join(msg for _, msg in problems)
    assert "dot-product" in messages and "threads = 8 > 4 cores" in messages
    assert "XnnpackExecutionProvider is not in this onnxruntime" in messages
    assert not any(fatal for fatal, _ in problems)  # all of these still run, only worse


def test_doctor_on_this_machine():
    here = inspect_device()
    assert here.cores >= 1 and here.memory_mb > 0 and "CPUExecutionProvider" in here.providers
    result = CliRunner().invoke(main, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    if here.machine == "x86_64" and "avx2" in here.features:
        assert report["fitting_profiles"] == ["x86-64-dev"] and report["problems"] == []
    other = "raspberry-pi-5" if here.machine == "x86_64" else "x86-64-dev"
    result = CliRunner().invoke(main, ["doctor", "--profile", other])
    assert result.exit_code == 1 and "ERROR: made for" in result.output


def test_doctor_measures_the_models_fidelity_here(exported, tmp_path):
    """The export keeps the reference's top-1 choices; doctor runs the same tokens with the profile it checks and
    reports the agreement, next to the export's own figure. A folder without them says so."""
    verified = exported("fp32-verified", precision="fp32", verify=True)
    ref = json.loads((verified / "nomoat.json").read_text())["verification"]
    assert len(ref["reference"]) == 2 and ref["accuracy_level"] in (1, 4) and ref["measured_on"]
    out = CliRunner().invoke(main, ["doctor", "--model", str(verified), "--profile", "x86-64-dev", "--json"])
    f = json.loads(out.output)["fidelity"]
    assert f["top1_agreement"] == 1.0 and f["tokens"] == sum(len(p["ids"]) for p in ref["reference"])
    assert f["at_export"]["top1_agreement"] == ref["top1_agreement"]
    text = CliRunner().invoke(main, ["doctor", "--model", str(verified), "--profile", "x86-64-dev"]).output
    assert "fidelity     100.0% top-1 agreement with the fp32 reference, measured here" in text
    # the export measured its int8-KV graph too; a profile that runs it is held to that figure
    int8 = ref["kv_variants"]["int8"]
    assert 0.5 <= int8["top1_agreement"] <= 1 and int8["mean_kl"] >= 0
    own = tmp_path / "int8-kv.toml"
    own.write_text('kv_cache = "int8"\n')
    out = CliRunner().invoke(main, ["doctor", "--model", str(verified), "--profile", str(own), "--json"])
    f = json.loads(out.output)["fidelity"]
    assert f["kv_cache"] == "int8" and f["at_export"]["top1_agreement"] == int8["top1_agreement"] == f["top1_agreement"]
    plain = exported("fp32-plain", precision="fp32")
    text = CliRunner().invoke(main, ["doctor", "--model", str(plain), "--profile", "x86-64-dev"]).output
    assert "fidelity     not measured: the export kept no reference" in text
    quiet = CliRunner().invoke(main, ["doctor", "--model", str(plain), "--profile", "x86-64-dev", "--no-fidelity"])
    assert "fidelity" not in quiet.output
