"""Load an exported model folder: manifest, file hashes, one InferenceSession, KV buffers.

The KV cache is allocated once (one [1, kv_heads, max_len, head_dim] OrtValue per layer for
keys and values) and bound as both past and present input/output of GroupQueryAttention:
decoding writes one row in place and never copies the cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .manifest import Manifest, ModelError, read_manifest
from .profile import Profile

log = logging.getLogger("nomoat.model")
MAX_CACHED_GRAPHS = 4  # optimized graphs kept in a profile's optimized_model_cache (~2x a model's size each)

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
        path = self.folder / self.manifest.data["graph"]["file"]
        quant = self.manifest.data["quantization"]
        level = p.accuracy_level
        if quant.get("fidelity") == "exact" and level not in (None, quant["accuracy_level"]):
            log.info("%s was exported for exact fidelity: keeping its accuracy levels, not the profile's %s",
                     self.manifest.name, level)
            level = None
        graph = graph_for_level(path, quant["accuracy_level"], level)
        providers = choose_providers(p)
        try:
            if p.optimized_model_cache and [name for name, _ in providers] == ["CPUExecutionProvider"]:
                try:
                    graph = self._prepacked_graph(graph, so, Path(p.optimized_model_cache).expanduser())
                    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # done already
                except OSError as e:  # a read-only or full disk: load as usual
                    log.warning("no optimized graph cache (%s); loading %s directly", e, graph.name)
            return ort.InferenceSession(str(graph), so, providers=providers)
        except Exception as e:  # onnxruntime raises several exception types for a bad model
            raise ModelError(f"onnxruntime could not load {path}: {str(e).splitlines()[0]}") from e

    def _prepacked_graph(self, graph: Path, so: ort.SessionOptions, cache: Path) -> Path:
        """The optimized graph for this CPU, with the kernels' prepacked weights in its external data file.

        Loading it maps the prepacked weights from disk instead of building a copy on the heap, so the
        weights cost page cache (shared, reclaimable) rather than private memory. The prepacked layout
        depends on the onnxruntime version, the accuracy level and the CPU, hence the folder's key.
        """
        from .doctor import inspect_device

        device = inspect_device()  # CPU name and feature flags: stable, unlike cpuinfo's clock speeds
        model = self.manifest.data["model_hash"][:12]
        key = hashlib.sha256(f"{graph.name} {ort.__version__} {device.machine} {device.cpu} {device.features} "
                             f"{so.graph_optimization_level}".encode()).hexdigest()[:12]
        target = cache / f"{model}-{key}"
        if not (target / "model.onnx").exists():
            for stale in cache.glob(f"{model}-*"):  # this model's graph for another version, level or CPU
                shutil.rmtree(stale, ignore_errors=True)
            cache.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cache))
            try:
                tmp.chmod(0o755)
                _write_prepacked_graph(graph, tmp / "model.onnx", so.graph_optimization_level)
                tmp.rename(target)
            except Exception as e:  # a full disk, or another process that made it first
                shutil.rmtree(tmp, ignore_errors=True)
                if not (target / "model.onnx").exists():
                    raise OSError(f"could not write {target}: {str(e).splitlines()[0]}") from e
            kept = [f for f in cache.iterdir() if not f.name.startswith(".")]  # not other processes' temps
            for old in sorted(kept, key=lambda f: f.stat().st_mtime)[:-MAX_CACHED_GRAPHS]:
                shutil.rmtree(old, ignore_errors=True)  # graphs of models no longer loaded here, oldest first
            log.info("wrote the optimized graph with prepacked weights to %s", target)
        return target / "model.onnx"

    def _init_kv(self) -> None:
        shape = list(self.manifest.kv_shape)
        shape[2] = self.max_length
        dtype = np.float16 if self.manifest.data["kv_cache"]["dtype"] == "float16" else np.float32
        self.kv_names = []
        self.kv = []
        if not self.manifest.shared_kv:
            return  # optimum's graphs: the generator carries the growing cache from run to run
        for i in range(self.manifest.num_layers):
            for part in ("key", "value"):
                buf = ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, "cpu", 0)
                self.kv.append(buf)
                self.kv_names.append((f"past_key_values.{i}.{part}", f"present.{i}.{part}"))

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()


def _write_prepacked_graph(graph: Path, out: Path, level: ort.GraphOptimizationLevel) -> None:
    """Let onnxruntime optimize `graph` for this CPU and save it with the prepacked weights as external data."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = level
    so.optimized_model_filepath = str(out)
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{out.name}.data")
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    so.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
    ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"])


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
