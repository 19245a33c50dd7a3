"""Run-time LoRA adapters: `.onnx_adapter` files (onnxruntime.AdapterFormat) fed as the graph's slot inputs.

An adapter file holds, for each slot it uses, `lora.{layer}.{target}.A` [in, r] and `.B` [r, out]
(B already multiplied by alpha/r), plus `nomoat.meta`: a uint8 tensor with JSON metadata
(name, base model hash, rank). Several adapters are stacked by concatenating their ranks,
each B scaled by its weight; the combined OrtValues are cached, so switching is a dict lookup.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .manifest import Manifest

META = "nomoat.meta"


class AdapterError(Exception):
    pass


@dataclass
class Adapter:
    name: str
    meta: dict
    tensors: dict[str, np.ndarray]


def write_adapter(path: Path, tensors: dict[str, np.ndarray], meta: dict, dtype: str = "float32") -> None:
    """float16 halves the file (and the fleet push); the runtime widens it to float32 on load."""
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(int(meta.get("version", 1)))
    fmt.set_model_version(1)
    params = {k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v, dtype)) for k, v in tensors.items()}
    params[META] = ort.OrtValue.ortvalue_from_numpy(np.frombuffer(json.dumps(meta).encode(), np.uint8).copy())
    fmt.set_parameters(params)
    fmt.export_adapter(str(path))


def read_parameters(path: str | Path) -> dict[str, np.ndarray]:
    """An .onnx_adapter file's tensors, copied. onnxruntime's values point into the AdapterFormat's buffer, so it is
    kept alive until they are copied (`read_adapter(p).get_parameters()[k].numpy()` in one expression read freed
    memory: a segfault on a 3.7 MB adapter)."""
    fmt = ort.AdapterFormat.read_adapter(str(path))
    params = fmt.get_parameters()
    tensors = {k: np.array(v.numpy(), copy=True) for k, v in params.items()}
    del params, fmt
    return tensors


def read_meta(path: str | Path) -> dict:
    """The nomoat metadata of an .onnx_adapter file ({} when it has none)."""
    tensors = read_parameters(path)
    return json.loads(tensors[META].tobytes()) if META in tensors else {}


def read_adapter(path: str | Path, manifest: Manifest, name: str | None = None) -> Adapter:
    """Read and check an adapter against the base model's manifest."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"adapter file not found: {path}")
    try:
        tensors = read_parameters(path)
        tensors = {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in tensors.items()}
    except Exception as e:
        raise AdapterError(f"unreadable adapter {path.name}: {str(e).splitlines()[0]}") from e
    if META not in tensors:
        raise AdapterError(f"{path.name} is not a nomoat adapter (no {META})")
    meta = json.loads(tensors.pop(META).tobytes())
    check_adapter(meta, tensors, manifest, path.name)
    return Adapter(name or meta.get("name") or path.stem, meta, tensors)


def check_adapter(meta: dict, tensors: dict[str, np.ndarray], manifest: Manifest, label: str) -> None:
    lora = manifest.lora
    if not lora["rank"]:
        raise AdapterError(f"{manifest.name} was exported without LoRA slots (--lora-slots); cannot apply {label}")
    if meta.get("base_model_hash") != manifest.model_hash:
        raise AdapterError(f"{label} was made for another base model (hash {str(meta.get('base_model_hash'))[:12]}…, "
                           f"this model is {manifest.model_hash[:12]}…)")
    slots = {s["A"]: s for s in lora["slots"]}
    for key, arr in tensors.items():
        a_name = key[:-1] + "A"
        if a_name not in slots:
            raise AdapterError(f"{label}: tensor {key} has no slot in this model (slots: {','.join(lora['targets'])})")
        s = slots[a_name]
        want = (s["in"], None) if key.endswith(".A") else (None, s["out"])
        if arr.ndim != 2 or any(w is not None and w != d for w, d in zip(want, arr.shape, strict=True)):
            raise AdapterError(f"{label}: {key} has shape {arr.shape}, the slot expects {want}")
        if min(arr.shape) > lora["rank"]:
            raise AdapterError(f"{label}: rank {min(arr.shape)} exceeds the model's slot rank {lora['rank']}")


KEEP_SELECTIONS = 8


class AdapterSet:
    """Loaded adapters and the combined slot tensors for each active selection."""

    def __init__(self, manifest: Manifest):
        self.manifest = manifest
        self.adapters: dict[str, Adapter] = {}
        # the most recent selections only: every distinct scale a request names would otherwise add a copy
        self._combined: OrderedDict[tuple, dict[str, ort.OrtValue]] = OrderedDict()
        self.changes = 0  # counts adds and removes: keys and values computed before a change are stale

    def add(self, adapter: Adapter) -> None:
        self.adapters[adapter.name] = adapter
        self.changes += 1
        self._forget(adapter.name)

    def remove(self, name: str) -> None:
        self.adapters.pop(name, None)
        self.changes += 1
        self._forget(name)

    def _forget(self, name: str) -> None:
        for key in [k for k in self._combined if name in {n for n, _ in k}]:
            del self._combined[key]

    def inputs(self, selection: tuple[tuple[str, float], ...] = ()) -> dict[str, ort.OrtValue]:
        """OrtValues for every slot input: the selected adapters stacked, zero-rank elsewhere."""
        key = tuple(selection)
        combined = self._combined.get(key)  # once: an install on another thread may drop the entry meanwhile
        if combined is None:
            for name, _ in key:
                if name not in self.adapters:
                    known = ", ".join(sorted(self.adapters)) or "none loaded"
                    raise AdapterError(f"unknown adapter {name!r} ({known})")
            combined = self._combined[key] = self._stack(key)
            while len(self._combined) > KEEP_SELECTIONS:
                self._combined.popitem(last=False)
        else:
            try:
                self._combined.move_to_end(key)  # most recently used
            except KeyError:
                pass
        return combined

    def _stack(self, selection) -> dict[str, ort.OrtValue]:
        out = {}
        rank = self.manifest.lora["rank"]
        for slot in self.manifest.lora["slots"]:
            a_parts = [np.zeros((slot["in"], 0), np.float32)]
            b_parts = [np.zeros((0, slot["out"]), np.float32)]
            for name, scale in selection:
                t = self.adapters[name].tensors
                if slot["A"] in t:
                    a_parts.append(t[slot["A"]])
                    b_parts.append(t[slot["B"]] * np.float32(scale))
            a, b = np.concatenate(a_parts, axis=1), np.concatenate(b_parts, axis=0)
            if a.shape[1] > rank:
                raise AdapterError(f"stacked rank {a.shape[1]} exceeds the slot rank {rank} at {slot['A']}")
            out[slot["A"]] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a))
            out[slot["B"]] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(b))
        return out
