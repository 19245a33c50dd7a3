"""PEFT LoRA adapters: read, check against a base, merge into weights, or pack for run-time slots.

A PEFT adapter stores, per target Linear, lora_A [r, in] and lora_B [out, r]; the update is
delta W = scale * B @ A with scale = alpha / r (alpha / sqrt(r) with rsLoRA).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .sources import Checkpoint, ExportError

_KEY = re.compile(r"(?:.*?)(model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj))\.lora_([AB])(?:\.default)?\.weight$")


@dataclass
class LoraAdapter:
    path: Path
    rank: int
    scale: float  # alpha / r (or rsLoRA), times the user's scale
    # "model.layers.{i}.self_attn.q_proj" -> (A [r, in], B [out, r])
    pairs: dict[str, tuple[np.ndarray, np.ndarray]]

    def delta(self, module: str) -> np.ndarray:
        a, b = self.pairs[module]
        return self.scale * (b @ a)


def parse_lora_arg(arg: str) -> tuple[Path, float]:
    """DIR or DIR:SCALE."""
    path, _, scale = arg.rpartition(":") if re.search(r":-?[\d.]+$", arg) else (arg, "", "1.0")
    try:
        return Path(path), float(scale)
    except ValueError as e:
        raise ExportError(f"bad --lora {arg!r}: expected DIR[:SCALE]") from e


def load_adapter(path: Path, user_scale: float = 1.0) -> LoraAdapter:
    cfg_file, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise ExportError(f"{path} is not a PEFT adapter folder (needs adapter_config.json and "
                          "adapter_model.safetensors)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"unreadable {cfg_file}: {e}") from e
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ExportError(f"{path}: only LoRA adapters are supported, not {cfg.get('peft_type')}")
    r, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"]))
    scale = alpha / (r ** 0.5) if cfg.get("use_rslora") else alpha / r
    from safetensors import safe_open

    parts: dict[str, dict[str, np.ndarray]] = {}
    try:
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():
                m = _KEY.match(key)
                if not m:
                    raise ExportError(f"{path}: unsupported adapter tensor {key}")
                parts.setdefault(m.group(1), {})[m.group(4)] = f.get_tensor(key).float().numpy()
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(f"unreadable adapter weights {weights}: {e}") from e
    pairs = {}
    for module, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise ExportError(f"{path}: {module} lacks lora_A or lora_B")
        pairs[module] = (ab["A"], ab["B"])
    if not pairs:
        raise ExportError(f"{path}: adapter has no LoRA tensors")
    return LoraAdapter(path, r, scale * user_scale, pairs)


def check_against(adapter: LoraAdapter, ckpt: Checkpoint) -> None:
    """Every target must exist in the base with matching shapes: else the adapter is for another model."""
    c = ckpt.config
    dims = {"q_proj": (c.num_heads * c.head_dim, c.hidden_size),
            "k_proj": (c.num_kv_heads * c.head_dim, c.hidden_size),
            "v_proj": (c.num_kv_heads * c.head_dim, c.hidden_size),
            "o_proj": (c.hidden_size, c.num_heads * c.head_dim),
            "gate_proj": (c.intermediate_size, c.hidden_size),
            "up_proj": (c.intermediate_size, c.hidden_size),
            "down_proj": (c.hidden_size, c.intermediate_size)}
    for module, (a, b) in adapter.pairs.items():
        layer, target = int(module.split(".")[2]), module.rsplit(".", 1)[1]
        if layer >= c.num_layers or target not in dims:
            raise ExportError(f"adapter {adapter.path.name} targets {module}, which this base model lacks")
        out, inp = dims[target]
        if a.shape[1] != inp or b.shape[0] != out:
            raise ExportError(f"adapter {adapter.path.name} was made for another base: {module} is "
                              f"{b.shape[0]}x{a.shape[1]} in the adapter, {out}x{inp} in the model")


def merged_deltas(adapters: list[LoraAdapter]) -> dict[str, np.ndarray]:
    """Sum of all adapters' updates, keyed by the HF weight name."""
    deltas: dict[str, np.ndarray] = {}
    for ad in adapters:
        for module in ad.pairs:
            name = f"{module}.weight"
            d = ad.delta(module)
            deltas[name] = deltas[name] + d if name in deltas else d
    return deltas


def slot_tensors(adapter: LoraAdapter) -> dict[str, np.ndarray]:
    """The graph inputs that make a slot export apply this adapter: A^T [in, r], scale*B^T [r, out]."""
    out = {}
    for module, (a, b) in adapter.pairs.items():
        layer, target = module.split(".")[2], module.rsplit(".", 1)[1]
        out[f"lora.{layer}.{target}.A"] = np.ascontiguousarray(a.T, dtype=np.float32)
        out[f"lora.{layer}.{target}.B"] = np.ascontiguousarray((adapter.scale * b).T, dtype=np.float32)
    return out
