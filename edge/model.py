"""Load an exported model folder: manifest, file hashes, one InferenceSession, KV buffers.

The KV cache is allocated once (one [1, kv_heads, max_len, head_dim] OrtValue per layer for
keys and values) and bound as both past and present input/output of GroupQueryAttention:
decoding writes one row in place and never copies the cache.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .manifest import Manifest, ModelError, read_manifest
from .profile import Profile

log = logging.getLogger("nomoat.model")

_LEVELS = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
           "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
           "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
           "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def choose_providers(profile: Profile) -> list[tuple[str, dict]]:
    """The profile's providers that this onnxruntime has, in order; CPU always last."""
    available = set(ort.get_available_providers())
    chosen = []
    for p in profile.providers:
        if p.name == "CPUExecutionProvider":
            continue
        if p.name in available:
            chosen.append((p.name, p.options))
        else:
            log.warning("execution provider %s is not in this onnxruntime build (%s); skipping it",
                        p.name, ", ".join(sorted(available)))
    cpu_opts = next((p.options for p in profile.providers if p.name == "CPUExecutionProvider"), {})
    return chosen + [("CPUExecutionProvider", cpu_opts)]


def graph_for_level(path: Path, exported_level: int, level: int | None) -> Path:
    """model.onnx, or a copy with MatMulNBits' accuracy_level changed for this device.

    The attribute is a one-byte varint, so a same-length byte replacement keeps the protobuf
    valid without the onnx package (which the device side does not install). The copy sits
    beside model.onnx (it names its weights file relatively), or in a temporary folder with a
    link to the weights when the model folder is read-only.
    """
    if level is None or level == exported_level:
        return path
    attr = b"\x0a\x0eaccuracy_level\x18"
    graph = path.read_bytes().replace(attr + bytes([exported_level]), attr + bytes([level]))
    target = path.with_name(f"{path.stem}.acc{level}.onnx")
    try:
        if not target.exists() or target.read_bytes() != graph:
            tmp = target.with_name(target.name + ".tmp")
            tmp.write_bytes(graph)
            tmp.replace(target)
    except OSError:
        folder = Path(tempfile.mkdtemp(prefix="nomoat-"))
        for f in path.parent.glob(f"{path.name}.data*"):
            (folder / f.name).symlink_to(f.resolve())
        target = folder / path.name
        target.write_bytes(graph)
    return target


class Model:
    def __init__(self, folder: str | Path, profile: Profile | None = None, verify_files: bool = True):
        t0 = time.perf_counter()
        self.profile = profile or Profile()
        self.manifest: Manifest = read_manifest(folder, verify_files=verify_files)
        self.folder = self.manifest.folder
        self.max_length = min(self.manifest.max_length, self.profile.context_length)
        self.session = self._session()
        self._init_kv()
        self.lora_slots = {s["A"]: s for s in self.manifest.lora["slots"]}
        self.load_seconds = time.perf_counter() - t0

    def _session(self) -> ort.InferenceSession:
        p = self.profile
        so = ort.SessionOptions()
        if p.threads:
            so.intra_op_num_threads = p.threads
        so.inter_op_num_threads = 1
        so.enable_cpu_mem_arena = p.arena
        so.enable_mem_pattern = p.memory_pattern
        so.graph_optimization_level = _LEVELS[p.graph_optimization]
        so.log_severity_level = 3
        if p.optimized_model_cache:
            so.optimized_model_filepath = p.optimized_model_cache
        path = self.folder / self.manifest.data["graph"]["file"]
        exported_level = self.manifest.data["quantization"]["accuracy_level"]
        graph = graph_for_level(path, exported_level, p.accuracy_level)
        try:
            return ort.InferenceSession(str(graph), so, providers=choose_providers(p))
        except Exception as e:  # onnxruntime raises several exception types for a bad model
            raise ModelError(f"onnxruntime could not load {path}: {str(e).splitlines()[0]}") from e

    def _init_kv(self) -> None:
        shape = list(self.manifest.kv_shape)
        shape[2] = self.max_length
        self.kv_names = []
        self.kv = []
        for i in range(self.manifest.num_layers):
            for part in ("key", "value"):
                buf = ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, "cpu", 0)
                self.kv.append(buf)
                self.kv_names.append((f"past_key_values.{i}.{part}", f"present.{i}.{part}"))

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
