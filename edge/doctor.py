"""`nomoat doctor`: what this device has, which bundled profile fits it, and what a profile asks that it lacks.

Reads /proc and /sys (Linux, Android); parsing is kept apart from reading so that the tests can feed it the
cpuinfo of a Raspberry Pi.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .expand import rows_bytes
from .manifest import read_manifest
from .profile import Profile, bundled_profiles, load_profile

# MIDR part numbers of the Arm cores found in boards and phones (/proc/cpuinfo "CPU part").
ARM_PARTS = {
    "0xd03": "Cortex-A53", "0xd04": "Cortex-A35", "0xd05": "Cortex-A55", "0xd07": "Cortex-A57",
    "0xd08": "Cortex-A72", "0xd09": "Cortex-A73", "0xd0a": "Cortex-A75", "0xd0b": "Cortex-A76",
    "0xd0d": "Cortex-A77", "0xd41": "Cortex-A78", "0xd44": "Cortex-X1", "0xd46": "Cortex-A510",
    "0xd47": "Cortex-A710", "0xd48": "Cortex-X2", "0xd4d": "Cortex-A715", "0xd4e": "Cortex-X3",
    "0xd80": "Cortex-A520", "0xd81": "Cortex-A720", "0xd82": "Cortex-X4",
}
# The CPU features that change which onnxruntime kernels run, per architecture.
KEY_FEATURES = {
    "aarch64": {"asimddp": "dot-product (int8 MatMulNBits)", "i8mm": "int8 matrix multiply",
                "asimdhp": "fp16 arithmetic", "sve": "SVE"},
    "x86_64": {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_vnni": "AVX-512 VNNI", "avx_vnni": "AVX-VNNI",
               "f16c": "fp16 conversion"},
}


@dataclass
class Device:
    machine: str
    cpu: str
    cores: int
    features: list[str]
    memory_mb: int
    available_mb: int
    android: bool = False
    board: str = ""
    python: str = field(default_factory=platform.python_version)
    onnxruntime: str = ort.__version__
    providers: list[str] = field(default_factory=ort.get_available_providers)


def parse_cpuinfo(text: str) -> tuple[str, list[str]]:
    """(cpu description, sorted feature flags) from /proc/cpuinfo of x86 ("model name", "flags") or Arm
    ("CPU part", "Features")."""
    names: list[str] = []
    features: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip().lower(), value.strip()
        if key in ("flags", "features"):
            features.update(value.split())
        elif key == "model name":
            names.append(value)
        elif key == "cpu part":
            names.append(ARM_PARTS.get(value.lower(), f"Arm part {value}"))
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    cpu = " + ".join(f"{c}x {n}" for n, c in counts.items()) or platform.processor() or "unknown"
    return cpu, sorted(features)


def parse_meminfo(text: str) -> tuple[int, int]:
    """(MemTotal, MemAvailable) in MiB."""
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if rest.strip().endswith("kB"):
            values[key.strip()] = int(rest.split()[0]) // 1024
    total = values.get("MemTotal", 0)
    return total, values.get("MemAvailable", total)


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace").replace("\x00", "").strip()
    except OSError:
        return ""


def inspect_device() -> Device:
    cpu, features = parse_cpuinfo(_read("/proc/cpuinfo"))
    total, available = parse_meminfo(_read("/proc/meminfo"))
    android = bool(os.environ.get("ANDROID_ROOT") or os.environ.get("TERMUX_VERSION")
                   or Path("/system/build.prop").exists())  # proot-distro binds /system from Android
    return Device(machine=platform.machine(), cpu=cpu, cores=os.cpu_count() or 1, features=features,
                  memory_mb=total, available_mb=available, android=android,
                  board=_read("/proc/device-tree/model"))


# What `nomoat serve` holds besides the weights and the KV cache: Python, numpy, onnxruntime and its buffers, plus
# the load's transient copy of the largest prepacked weights. Fitted to measured peaks (VmHWM of `nomoat serve` /
# `nomoat bench`, x86, 2 threads, README "Memory"): SmolLM2-135M (105 MB of weights) 303-320 MiB after a 1000-token
# prompt at context 2048; the 1.1B Q4_0 LLaMA (709 MB) 1065-1270 MiB.
RUNTIME_MB = 130
LOAD_SHARE = 0.25
OS_RESERVE_MB = 100  # Raspberry Pi OS Lite after boot


def kv_cache_mb(model: str | Path, context_length: int, kv_cache: str = "") -> float:
    """The KV cache's MiB at this context, in the type a profile's kv_cache gives this folder."""
    m = read_manifest(model, verify_files=False)
    _, kv_heads, max_length, head_dim = m.kv_shape
    width = np.dtype(m.kv_graph(kv_cache)[0]).itemsize
    return 2 * m.num_layers * kv_heads * min(context_length, max_length) * head_dim * width / 2**20


def model_memory_mb(model: str | Path, context_length: int, kv_cache: str = "") -> float:
    """The peak a `nomoat serve` process reaches with this model at this context: the weights, the KV cache the
    runtime preallocates, the runtime itself, and the load's transient copies (RUNTIME_MB, LOAD_SHARE)."""
    m = read_manifest(model, verify_files=False)
    weights = sum(p.stat().st_size for p in m.folder.glob("model.onnx*")) / 2**20
    if m.expanded:  # a compact folder: its GGUF rows are converted at load, and onnxruntime reads the larger blocks
        weights += (m.expanded["bytes"] - rows_bytes(m.expanded)) / 2**20
    return round(weights * (1 + LOAD_SHARE) + kv_cache_mb(model, context_length, kv_cache) + RUNTIME_MB, 1)


def fitting_context(profile: Profile, device: Device) -> int:
    """The profile's context length, halved while its memory cap is above what this device has (a 2 GB Pi 5
    runs the Pi 5 profile, with less context)."""
    context, cap = profile.context_length, profile.memory_cap_mb
    while cap and cap > device.memory_mb and context > 256:
        context, cap = context // 2, cap // 2
    return context


def check(profile: Profile, device: Device, model: str | Path | None = None) -> list[tuple[bool, str]]:
    """Problems of running `profile` here: (fatal, message); fatal ones mean the profile does not fit."""
    found: list[tuple[bool, str]] = []
    if profile.arch and profile.arch != device.machine:
        found.append((True, f"made for {profile.arch}; this machine is {device.machine}"))
    missing = [f for f in profile.cpu_features if f not in device.features]
    if missing:
        found.append((True, f"needs CPU features this CPU lacks: {', '.join(missing)}"))
    if profile.android != device.android:
        found.append((True, "made for Android" if profile.android else "not made for Android"))
    if profile.memory_cap_mb > device.memory_mb:
        found.append((False, f"memory cap {profile.memory_cap_mb} MiB > {device.memory_mb} MiB installed: context "
                             f"{fitting_context(profile, device)} instead of {profile.context_length} (set "
                             f"context_length in a profile of your own to choose)"))
    if profile.cpus and not any(c in device.cpu for c in profile.cpus):
        found.append((False, f"tuned for {', '.join(profile.cpus)}; this CPU is {device.cpu}"))
    if device.machine == "aarch64" and profile.accuracy_level == 4 and "asimddp" not in device.features:
        found.append((False, "accuracy_level 4 needs dot-product instructions (asimddp); "
                             "onnxruntime falls back to the slower fp32 path here: use 1"))
    for p in profile.providers:
        if p.name not in device.providers:
            found.append((False, f"{p.name} is not in this onnxruntime ({', '.join(device.providers)}); skipped"))
    if profile.threads > device.cores:
        found.append((False, f"threads = {profile.threads} > {device.cores} cores"))
    if model is not None:
        context = fitting_context(profile, device)
        need = model_memory_mb(model, context, profile.kv_cache)
        # what the board can hold (its memory less the OS's share), not what happens to be free now
        budget = min(filter(None, (profile.memory_cap_mb, device.memory_mb - OS_RESERVE_MB)), default=0)
        if budget and need > budget:
            found.append((False, f"the model needs ~{need:.0f} MiB at its peak (context {context}) > {budget} MiB: "
                                 f"it will not fit; lower context_length or use a smaller model"))
    return found


def fitting_profiles(device: Device) -> list[str]:
    """Bundled profiles without fatal problems here: those tuned for this CPU first, then those whose memory cap
    this device has, then the most capable (largest memory cap)."""
    fits = []
    for name in bundled_profiles():
        profile = load_profile(name)
        if not any(fatal for fatal, _ in check(profile, device)):
            tuned = not profile.cpus or any(c in device.cpu for c in profile.cpus)
            fits.append((not tuned, profile.memory_cap_mb > device.memory_mb, -profile.memory_cap_mb, name))
    return [f[-1] for f in sorted(fits)]


def measure_fidelity(model: str | Path, profile: Profile, device: Device) -> dict | None:
    """The model's top-1 agreement with its export's fp32 reference, run here with `profile` (edge/fidelity.py),
    next to the figure the export measured on its own machine; None when the export kept no reference."""
    from .fidelity import measure
    from .generate import Generator

    gen = Generator(model, replace(profile, context_length=fitting_context(profile, device)), verify_files=False)
    here = measure(gen)
    if here is None:
        return None
    at_export = gen.manifest.verification(gen.model.kv_dtype) or {}  # the figure for the graph this profile runs
    return {**here, "kv_cache": gen.model.kv_dtype,
            "at_export": {k: at_export.get(k) for k in ("top1_agreement", "measured_on", "accuracy_level")}}


def report(device: Device, profile: Profile | None = None, model: str | Path | None = None,
           fidelity: bool = False) -> dict:
    fits = fitting_profiles(device)
    chosen = profile or (load_profile(fits[0]) if fits else Profile())
    problems = check(chosen, device, model)
    r = {"device": asdict(device), "fitting_profiles": fits, "profile": chosen.name,
         "problems": [{"fatal": fatal, "message": msg} for fatal, msg in problems],
         "context_length": fitting_context(chosen, device),
         "model_memory_mb": model_memory_mb(model, fitting_context(chosen, device), chosen.kv_cache) if model else None}
    if model and fidelity and not any(fatal for fatal, _ in problems):  # a profile that cannot run here: no run
        r["fidelity"] = measure_fidelity(model, chosen, device)
    return r


def format_fidelity(f: dict | None) -> str:
    if f is None:
        return "not measured: the export kept no reference (export with --verify, which needs torch)"
    line = (f"{f['top1_agreement']:.1%} top-1 agreement with the fp32 reference, measured here "
            f"({f['tokens']} teacher-forced tokens, accuracy level {f['accuracy_level']}, "
            f"{f.get('kv_cache', 'float32')} KV cache)")
    e = f["at_export"]
    if e.get("top1_agreement") is not None:
        line += f"; {e['top1_agreement']:.1%} at export ({e.get('measured_on') or '?'}, level {e.get('accuracy_level', '?')})"
    if f["accuracy_level"] == 4 and f["top1_agreement"] < 0.97:
        line += ("\n             accuracy_level = 1 in a profile of your own follows the reference more closely "
                 "(fp32 compute, slower: `nomoat bench --profile FILE` measures by how much)")
    return line


def format_report(r: dict) -> str:
    d = r["device"]
    notable = KEY_FEATURES.get(d["machine"], {})
    features = ", ".join(f"{label}: {'yes' if flag in d['features'] else 'no'}" for flag, label in notable.items())
    lines = [
        f"machine      {d['machine']}{' (' + d['board'] + ')' if d['board'] else ''}{', Android' if d['android'] else ''}",
        f"cpu          {d['cpu']} ({d['cores']} cores)",
        f"features     {features or ', '.join(d['features'][:12])}",
        f"memory       {d['memory_mb']} MiB, {d['available_mb']} MiB available",
        f"python       {d['python']}",
        f"onnxruntime  {d['onnxruntime']}: {', '.join(d['providers'])}",
        f"fits         {', '.join(r['fitting_profiles']) or 'no bundled profile (the built-in default is used)'}",
    ]
    if r["model_memory_mb"] is not None:
        lines.append(f"model        ~{r['model_memory_mb']:.0f} MiB at its peak (weights, KV cache, runtime)")
    lines.append(f"profile      {r['profile']} (context {r['context_length']}): "
                 + ("OK" if not r["problems"] else f"{len(r['problems'])} problem(s)"))
    lines += [f"  {'ERROR' if p['fatal'] else 'warning'}: {p['message']}" for p in r["problems"]]
    if "fidelity" in r:
        lines.append(f"fidelity     {format_fidelity(r['fidelity'])}")
    return "\n".join(lines)
