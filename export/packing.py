"""`nomoat adapter pack`: a PEFT adapter -> a `.onnx_adapter` for a model's run-time LoRA slots."""

from __future__ import annotations

import time
from pathlib import Path

from nomoat.edge.adapters import check_adapter, write_adapter
from nomoat.edge.manifest import read_manifest

from .lora import load_adapter, slot_tensors


def pack_adapter(peft_dir: Path, model_dir: Path, output: Path, name: str | None = None, version: int = 1,
                 scale: float = 1.0, dtype: str = "float32") -> dict:
    manifest = read_manifest(model_dir, verify_files=False)
    adapter = load_adapter(peft_dir, scale)
    tensors = slot_tensors(adapter)
    meta = {
        "name": name or peft_dir.name,
        "version": version,
        "base_model_hash": manifest.model_hash,
        "base_model": manifest.name,
        "rank": adapter.rank,
        "targets": sorted({k.split(".")[2] for k in tensors}),
        "source": peft_dir.name,
        "dtype": dtype,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    check_adapter(meta, tensors, manifest, peft_dir.name)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    write_adapter(tmp, tensors, meta, dtype)
    tmp.replace(output)
    return {**meta, "bytes": output.stat().st_size, "slots": sorted(tensors)}
