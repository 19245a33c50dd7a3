"""Load an exported model folder: manifest, file hashes, one InferenceSession, KV buffers.

The KV cache is allocated once (one [1, kv_heads, max_len, head_dim] OrtValue per layer for
keys and values) and bound as both past and present input/output of GroupQueryAttention:
decoding writes one row in place and never copies the cache.
"""

from __future__ import annotations

import logging
import os
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


def _graph_bytes(path: Path, exported_level: int, level: int | None) -> bytes | None:
    """model.onnx with MatMulNBits' accuracy_level changed, or None when no change is needed.

    The attribute is a one-byte varint, so a same-length byte replacement keeps the protobuf
    valid without the onnx package (which the device side does not install).
    """
    if level is None or level == exported_level:
        return None
    raw = path.read_bytes()
    attr = b"\x0a\x0eaccuracy_level\x18"
    return raw.replace(attr + bytes([exported_level]), attr + bytes([level]))


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
        # weights are page-aligned in model.onnx.data: let onnxruntime map rather than copy them
        so.add_session_config_entry("session.use_mmap_for_external_initializers", "1") \
            if hasattr(so, "add_session_config_entry") else None
        if p.optimized_model_cache:
            so.optimized_model_filepath = p.optimized_model_cache
        path = self.folder / self.manifest.data["graph"]["file"]
        exported_level = self.manifest.data["quantization"]["accuracy_level"]
        graph = _graph_bytes(path, exported_level, p.accuracy_level)
        providers = choose_providers(p)
        try:
            if graph is None:
                return ort.InferenceSession(str(path), so, providers=providers)
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(self.folder))
            return ort.InferenceSession(graph, so, providers=providers)
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
