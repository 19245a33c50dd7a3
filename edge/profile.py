"""Device profiles: TOML files in firmware-configs/ that say how this device runs a model.

Unknown keys and wrong types are errors (a typo in a profile must not silently fall back
to a default on a device in a field).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path


class ProfileError(Exception):
    pass


@dataclass
class Provider:
    name: str  # e.g. "CPUExecutionProvider", "XnnpackExecutionProvider"
    options: dict = field(default_factory=dict)


@dataclass
class MqttSettings:
    broker: str = "mqtt://127.0.0.1:1883"
    prefix: str = "nomoat"
    fleet: str = "default"
    device: str = ""
    username: str = ""
    password: str = ""
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    keepalive: int = 30
    session_expiry: int = 86400  # seconds the broker keeps our session (and queued prompts) while offline


@dataclass
class Profile:
    name: str = "default"
    description: str = ""
    # What the profile is for (`nomoat doctor` matches them against the machine; empty = any).
    arch: str = ""  # platform.machine(): "aarch64", "x86_64"
    cpu_features: list[str] = field(default_factory=list)  # /proc/cpuinfo flags it needs, e.g. "asimddp"
    cpus: list[str] = field(default_factory=list)  # the cores it is tuned for, e.g. "Cortex-A53": ranks it first there
    android: bool = False  # only for Android (Termux / proot-distro)
    providers: list[Provider] = field(default_factory=lambda: [Provider("CPUExecutionProvider")])
    threads: int = 0  # 0: onnxruntime decides (physical cores)
    arena: bool = True
    memory_pattern: bool = True
    graph_optimization: str = "all"  # disable | basic | extended | all (basic+ folds the fp16 scale casts)
    # Folder for this device's optimized graph with its prepacked weights in a memory-mapped file (the first
    # load writes it): without it the kernels' prepacked copy of the weights lives on the heap.
    optimized_model_cache: str = ""
    accuracy_level: int | None = None  # MatMulNBits: None = as exported, 0/1 fp32 compute, 4 int8
    # A second session for prompts of prefill_min_tokens+ with the 4-bit layers at this level (x86: 1, whose
    # fp32 kernels prefill ~30 % faster than the int8 ones that decode fastest); None: one session.
    prefill_accuracy_level: int | None = None
    prefill_min_tokens: int = 32
    context_length: int = 2048
    # The KV cache's type: "" as exported, or "float32" / "int8" (an export with either cache carries the graph
    # for the other too; a folder without it keeps its own). int8 holds a quarter of float32's bytes and decodes
    # long contexts faster, for ~1 point of top-1 agreement (README, "int8 KV cache").
    kv_cache: str = ""
    prefill_chunk: int = 128  # feed long prompts in chunks (0: at once): caps peak memory, and no slower
    # Keep the cache between calls and feed a prompt from the first token the cache does not hold (a chat's
    # history, a shared system prompt). Off: every prompt is fed whole.
    prompt_cache: bool = True
    # Speculative decoding by prompt lookup (edge/speculate.py): at most this many drafted tokens checked per pass;
    # 0: off. Answers that copy from their input (extract, rewrite, summarise, edit code) come several times faster.
    draft_tokens: int = 6
    # A smaller exported model with the same tokenizer that makes the drafts instead (the user's configuration or
    # `--draft`): helps open-ended text too, for its memory and its steps. "": prompt lookup.
    draft_model: str = ""
    memory_cap_mb: int = 0  # informative: `nomoat doctor` warns when the model will not fit
    queue_size: int = 8
    max_prompt_chars: int = 16000
    max_payload_bytes: int = 65536
    max_new_tokens: int = 1024
    adapter_store: str = ""  # folder for installed adapters (fleet push)
    adapter_store_mb: int = 256
    trusted_keys: list[str] = field(default_factory=list)  # Ed25519 public keys, hex or base64
    mqtt: MqttSettings = field(default_factory=MqttSettings)


_GRAPH_LEVELS = ("disable", "basic", "extended", "all")
KV_CACHES = ("", "float32", "int8")  # "": as exported


def _check(cls, data: dict, where: str) -> dict:
    known = {f.name: f for f in fields(cls)}
    for key in data:
        if key not in known:
            raise ProfileError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(known))})")
    return known


def _typed(value, default, key: str, where: str):
    if default is None or isinstance(default, (dict, list)):
        return value
    kind = type(default)
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise ProfileError(f"{where}: {key} must be {kind.__name__}, got {value!r}")
    return value


def profile_from_dict(data: dict, where: str = "profile") -> Profile:
    _check(Profile, data, where)
    p = Profile()
    for key, value in data.items():
        if key == "providers":
            if not isinstance(value, list) or not value:
                raise ProfileError(f"{where}: providers must be a non-empty list")
            p.providers = []
            for item in value:
                item = {"name": item} if isinstance(item, str) else item
                _check(Provider, item, f"{where}: providers")
                p.providers.append(Provider(str(item["name"]), dict(item.get("options", {}))))
        elif key == "mqtt":
            _check(MqttSettings, value, f"{where}: [mqtt]")
            for k, v in value.items():
                setattr(p.mqtt, k, _typed(v, getattr(MqttSettings(), k), k, f"{where}: [mqtt]"))
        elif key in ("accuracy_level", "prefill_accuracy_level"):
            if value not in (0, 1, 2, 3, 4):
                raise ProfileError(f"{where}: {key} must be 0, 1, 2, 3 or 4, got {value!r}")
            setattr(p, key, value)
        else:
            setattr(p, key, _typed(value, getattr(Profile(), key), key, where))
    check_values(p, where)
    return p


def check_values(p: Profile, where: str) -> None:
    """The settings' ranges (after a profile, and again after the user's config file changed some)."""
    if p.kv_cache not in KV_CACHES:
        raise ProfileError(f"{where}: kv_cache must be one of {', '.join(map(repr, KV_CACHES))}, got {p.kv_cache!r}")
    if p.graph_optimization not in _GRAPH_LEVELS:
        raise ProfileError(f"{where}: graph_optimization must be one of {_GRAPH_LEVELS}")
    if p.threads < 0 or p.context_length < 16 or p.queue_size < 1 or p.prefill_chunk < 0 or p.draft_tokens < 0:
        raise ProfileError(f"{where}: threads >= 0, context_length >= 16, queue_size >= 1, prefill_chunk >= 0 "
                           "and draft_tokens >= 0 are required")


def bundled_profiles() -> dict[str, Path]:
    """The profiles of firmware-configs/ (in a checkout) or edge/firmware_configs (in an installed wheel)."""
    here = Path(__file__).resolve().parent
    for folder in (here.parent / "firmware-configs", here / "firmware_configs"):
        if folder.is_dir():
            return {p.stem: p for p in sorted(folder.glob("*.toml"))}
    return {}


def load_profile(path: str | Path | None) -> Profile:
    """A profile from a TOML file, a name in firmware-configs/, or the built-in default."""
    if path is None:
        return Profile()
    candidate = Path(path)
    if not candidate.exists():
        bundled = bundled_profiles()
        if str(path) not in bundled:
            raise ProfileError(f"profile not found: {path} (bundled: {', '.join(bundled) or 'none'})")
        candidate = bundled[str(path)]
    try:
        data = tomllib.loads(candidate.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ProfileError(f"unreadable profile {candidate}: {e}") from e
    data.setdefault("name", candidate.stem)
    return profile_from_dict(data, str(candidate))
