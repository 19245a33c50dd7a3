"""Load an exported model folder: manifest, file hashes, one InferenceSession, KV buffers.

The KV cache is allocated once (one [1, kv_heads, max_len, head_dim] OrtValue per layer for
keys and values) and bound as both past and present input/output of GroupQueryAttention:
decoding writes one row in place and never copies the cache.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from . import expand
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


_ACCURACY = b"\x0a\x0eaccuracy_level\x18"  # a MatMulNBits attribute: name, then the varint value
_INT_TYPE = b"\xa0\x01\x02"  # AttributeProto.type = INT
_EXTERNAL_DATA_FOLDER = "session.model_external_initializers_file_folder_path"


def graph_with_level(graph: bytes, exported_level: int, level: int, bits: int | None = None) -> tuple[bytes, int]:
    """The serialized graph with MatMulNBits' accuracy_level changed (in `bits`-bit nodes only when given),
    and how many nodes changed.

    The attribute is a one-byte varint, so a same-length byte replacement keeps the protobuf valid
    without the onnx package (which the device side does not install). The exporter writes the
    attributes sorted by name, so `bits` follows `accuracy_level`.
    """
    old, new = _ACCURACY + bytes([exported_level]), _ACCURACY + bytes([level])
    if bits is not None:
        tail = _INT_TYPE + b"*\x0b\x0a\x04bits\x18" + bytes([bits])
        old, new = old + tail, new + tail
    return graph.replace(old, new), graph.count(old)


class Model:
    def __init__(self, folder: str | Path, profile: Profile | None = None, verify_files: bool = True,
                 shared_threads: bool = False):
        """shared_threads: run on the process's one shared thread pool (a model and its draft model)."""
        t0 = time.perf_counter()
        self.profile = profile or Profile()
        self.shared_threads = shared_threads
        self.manifest: Manifest = read_manifest(folder, verify_files=verify_files)
        self.folder = self.manifest.folder
        self._verify = verify_files
        self._scratch: Path | None = None  # a compact folder's converted weights, staged while sessions are made
        self.max_length = min(self.manifest.max_length, self.profile.context_length)
        self.kv_dtype, self._graph_file = self._kv_graph()
        quant = self.manifest.data["quantization"]
        self.exact = quant.get("fidelity") == "exact"
        self._exported_level = quant["accuracy_level"]
        level = self.profile.accuracy_level
        if self.exact and level not in (None, self._exported_level):
            log.info("%s was exported for exact fidelity: keeping its accuracy levels, not the profile's %s",
                     self.manifest.name, level)
            level = None
        self.level = self._exported_level if level is None else level  # the main session's
        try:
            self.session = self._session("main", *self._graph(self.level))
            self.prefill_session = self._prefill_session()
        finally:
            if self._scratch:  # onnxruntime has read what it needs
                shutil.rmtree(self._scratch, ignore_errors=True)
        self._init_kv()
        self.lora_slots = {s["A"]: s for s in self.manifest.lora["slots"]}
        folders = [self.folder]
        if self.profile.optimized_model_cache:
            folders.append(Path(self.profile.optimized_model_cache).expanduser())
        self.released_bytes = release_load_pages(folders)
        self.load_seconds = time.perf_counter() - t0

    def _kv_graph(self) -> tuple[str, Path]:
        """The KV cache type this load uses (the profile's kv_cache where the folder has that graph, else the
        export's) and its graph file."""
        wanted = self.profile.kv_cache
        dtype, file = self.manifest.kv_graph(wanted)
        if wanted and dtype != wanted:
            log.warning("%s has no graph with a %s KV cache (exported before nomoat wrote one, or with --kv-dtype "
                        "float16): keeping its %s cache; re-export it for kv_cache = %r", self.manifest.name, wanted,
                        dtype, wanted)
        return dtype, self.folder / file

    def _graph(self, level: int, bits: int | None = None) -> tuple[str, bytes | None]:
        """(cache label, serialized graph) for this accuracy level; None: the graph file as it is."""
        kv = "" if self.kv_dtype == self.manifest.kv_dtype else f"-kv-{self.kv_dtype}"
        if level == self._exported_level:
            return f"acc{level}{kv}", None
        graph, changed = graph_with_level(self._graph_file.read_bytes(), self._exported_level, level, bits)
        return (f"acc{level}" if bits is None else f"acc{level}-{bits}bit") + kv, graph if changed else None

    def _prefill_session(self) -> ort.InferenceSession | None:
        """A second session for long prompts with the 4-bit layers at `prefill_accuracy_level`.

        On x86 onnxruntime's fp32 int4 kernels (level 1) beat its int8 ones (level 4) on a 128-token
        prompt by about 30 %, while level 4 decodes 2-3x faster; the lm_head keeps the main session's
        level (an 8-bit one has no fast fp32 kernel). The sessions share the KV buffers: only the weights
        are twice.
        """
        level = self.profile.prefill_accuracy_level
        if level is None or level == self.level or self.exact:
            return None
        if not self.manifest.shared_kv:
            return None  # optimum's graphs carry the cache through the outputs: one session is simpler
        label, graph = self._graph(level, bits=4)
        if graph is None:
            log.info("no 4-bit layers to switch to accuracy level %s: one session", level)
            return None
        graph, _ = graph_with_level(graph, self._exported_level, self.level)  # the other layers: as the main's
        return self._session("prefill", f"{label}-decode-acc{self.level}", graph)

    def _session(self, kind: str, label: str, graph: bytes | None) -> ort.InferenceSession:
        """kind: "main" or "prefill", one graph cache entry each; label: names the graph within it;
        graph: the serialized graph, None for model.onnx as it is."""
        p = self.profile
        optimization = _LEVELS[p.graph_optimization]
        providers = choose_providers(p)
        try:
            if p.optimized_model_cache and [name for name, _ in providers] == ["CPUExecutionProvider"]:
                try:
                    cached = self._prepacked_graph(kind, label, graph, optimization,
                                                   Path(p.optimized_model_cache).expanduser())
                    so = _session_options(p, ort.GraphOptimizationLevel.ORT_DISABLE_ALL, None,  # optimized already
                                          self.shared_threads)
                    return ort.InferenceSession(str(cached), so, providers=providers)
                except OSError as e:  # a read-only or full disk: load as usual
                    log.warning("no optimized graph cache (%s); loading %s directly", e, self._graph_file.name)
            source, data_folder = self._source(graph)
            so = _session_options(p, optimization, data_folder, self.shared_threads)
            return ort.InferenceSession(source, so, providers=providers)
        except ModelError:
            raise
        except Exception as e:  # onnxruntime raises several exception types for a bad model
            raise ModelError(f"onnxruntime could not load {self._graph_file}: {str(e).splitlines()[0]}") from e

    def _source(self, graph: bytes | None) -> tuple[str | bytes, Path | None]:
        """What onnxruntime loads (the graph's path, or the graph itself) and where its external data is when that
        is not beside the path: the model folder, or for a compact folder the staged scratch folder."""
        if self.manifest.expanded:
            return graph or self._graph_file.read_bytes(), self._staged()
        return (str(self._graph_file), None) if graph is None else (graph, self.folder)

    def _staged(self) -> Path:
        """The scratch folder with a compact folder's converted weights (edge/expand.py), made once per load."""
        if self._scratch is None:
            t0 = time.perf_counter()
            cache = self.profile.optimized_model_cache
            try:
                parent = Path(cache).expanduser() if cache else None
                if parent:
                    parent.mkdir(parents=True, exist_ok=True)
                self._scratch = expand.stage(self.folder, self.manifest.expanded, parent, check=self._verify)
            except (OSError, ValueError) as e:
                raise ModelError(f"{self.folder}: cannot convert its compact weights: {e}") from e
            log.info("converted %.1f MiB of GGUF rows in %.2f s", self.manifest.expanded["bytes"] / 2**20,
                     time.perf_counter() - t0)
        return self._scratch

    def _prepacked_graph(self, kind: str, label: str, graph: bytes | None, optimization: ort.GraphOptimizationLevel,
                         cache: Path) -> Path:
        """The optimized graph for this CPU, with the kernels' prepacked weights in its external data file.

        Loading it maps the prepacked weights from disk instead of building a copy on the heap, so the
        weights cost page cache (shared, reclaimable) rather than private memory. The prepacked layout
        depends on the onnxruntime version, the accuracy level and the CPU, hence the folder's key.
        """
        from .doctor import inspect_device

        device = inspect_device()  # CPU name and feature flags: stable, unlike cpuinfo's clock speeds
        model = self.manifest.data["model_hash"][:12]
        key = hashlib.sha256(f"{label} {ort.__version__} {device.machine} {device.cpu} {device.features} "
                             f"{optimization}".encode()).hexdigest()[:12]
        target = cache / f"{model}-{kind}-{key}"
        if not (target / "model.onnx").exists():
            for stale in cache.glob(f"{model}-{kind}-*"):  # this graph for another version, level or CPU
                shutil.rmtree(stale, ignore_errors=True)
            cache.mkdir(parents=True, exist_ok=True)
            source, data_folder = self._source(graph)
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cache))
            try:
                tmp.chmod(0o755)
                _write_prepacked_graph(source, tmp / "model.onnx", optimization, data_folder)
                tmp.rename(target)
                trim_heap()  # the writer's session is gone: before the next one fills the heap above its pages
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
        dtype = np.dtype(self.kv_dtype)  # KV_DTYPES are numpy's names
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


_pool_threads: int | None = None  # the shared pool's size once made; -1: this onnxruntime cannot share one


def _shared_pool(threads: int) -> bool:
    """Make the process's shared intra-op thread pool (the first caller's size wins, and every later session runs on
    it); False where this onnxruntime cannot (before 1.21 Python had no global pools).

    Why share: a session's pool spins for a while after each run, on the cores the next session needs. SmolLM2
    fp32 checking drafts from its Q4_1 export, 2 threads: a 7-row pass and 6 draft steps took 133 ms with a pool
    each, 100 ms with spinning off (which slows every step), 76 ms with one shared pool (the parts alone: 25 + 6 x 8)."""
    global _pool_threads
    if _pool_threads is None:
        setter = getattr(ort.capi._pybind_state, "set_global_thread_pool_sizes", None)
        if setter is None or not hasattr(ort.SessionOptions(), "use_per_session_threads"):
            _pool_threads = -1
        else:
            setter(threads, 1)
            _pool_threads = threads
    if _pool_threads not in (-1, threads):
        log.debug("the shared thread pool has %s threads, not %s", _pool_threads or "onnxruntime's default", threads)
    return _pool_threads != -1


def _session_options(p: Profile, optimization: ort.GraphOptimizationLevel,
                     data_folder: Path | None, shared: bool = False) -> ort.SessionOptions:
    so = ort.SessionOptions()
    # once the process has a shared pool, onnxruntime requires every later session to use it
    if (shared or _pool_threads not in (None, -1)) and _shared_pool(p.threads):
        so.use_per_session_threads = False
    elif shared:  # a pool each: at least they do not spin on each other's cores
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if getattr(so, "use_per_session_threads", True):  # (the shared pool's sizes are its own)
        if p.threads:
            so.intra_op_num_threads = p.threads
        so.inter_op_num_threads = 1
    so.enable_cpu_mem_arena = p.arena
    so.enable_mem_pattern = p.memory_pattern
    so.graph_optimization_level = optimization
    so.log_severity_level = 3
    if data_folder is not None:
        so.add_session_config_entry(_EXTERNAL_DATA_FOLDER, str(data_folder))
    return so


def _write_prepacked_graph(source: str | bytes, out: Path, optimization: ort.GraphOptimizationLevel,
                           data_folder: Path | None) -> None:
    """Let onnxruntime optimize the graph for this CPU and save it with the prepacked weights as external data."""
    so = _session_options(Profile(threads=1), optimization, data_folder)
    so.optimized_model_filepath = str(out)
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{out.name}.data")
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    so.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
    ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])


_MADV_DONTNEED = 4  # the same number on every Linux architecture (Android included)


def release_load_pages(folders: list[Path]) -> int:
    """Unmap the weights-file pages that loading touched, so that RSS counts only what generation reads.

    onnxruntime maps the weights (external data) and, with the graph cache, reads every original
    initializer once more to prepack and check it; those clean file pages then stay in this process's
    RSS, ~45 MiB for SmolLM2, though generation reads the prepacked copies. MADV_DONTNEED takes them out
    of this process (they stay in the page cache); whatever generation does read faults back in on first
    use. Mappings holding a private (copy-on-write) page are left alone, so nothing onnxruntime wrote can
    be lost. Linux and Android only (elsewhere a no-op). Returns the resident bytes released.
    """
    prefixes = tuple(f"{Path(f).resolve()}/" for f in folders)
    try:
        smaps = Path("/proc/self/smaps").read_text()
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    mappings: list[dict] = []
    for line in smaps.splitlines():
        head = line.split(maxsplit=5)
        if head and "-" in head[0]:  # "start-end perms offset dev inode [path]" opens a mapping
            start, end = (int(x, 16) for x in head[0].split("-"))
            mappings.append({"start": start, "end": end, "path": head[5] if len(head) > 5 else ""})
        elif mappings and head and head[0] in ("Rss:", "Anonymous:"):
            mappings[-1][head[0]] = int(head[1])
    released = 0
    for m in mappings:
        if m["path"].startswith(prefixes) and m["path"].endswith(".data") and m.get("Anonymous:") == 0 \
                and m.get("Rss:", 0) > 0 and madvise(m["start"], m["end"] - m["start"], _MADV_DONTNEED) == 0:
            released += m["Rss:"] * 1024
    return released


def trim_heap() -> None:
    """Hand the memory freed after loading (JSON parsing, graph optimization) back to the OS.

    glibc keeps freed heap pages for reuse, so without this a loaded model carries ~15-40 MiB of
    garbage in its RSS. A no-op where the C library has no malloc_trim (musl, Android's bionic).
    """
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
