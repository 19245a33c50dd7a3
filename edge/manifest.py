"""nomoat.json: the contract between the exporter (host) and the runtime (device).

The exporter writes it once; the runtime reads it and trusts nothing else about the graph.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "nomoat.json"
VERIFIED = ".nomoat-verified.json"  # size and mtime of each file when its sha256 last matched
# 2: the graph takes token embeddings, which the runtime reads from the weights file; 3: compact folders, whose
# "expanded" weights the runtime converts from GGUF rows at load (edge/expand.py)
FORMAT_VERSION = 3
KV_DTYPES = ("float32", "float16", "int8")  # what the runtime can allocate and bind (numpy dtype names)


class ModelError(Exception):
    """A model folder that cannot be used, with the reason in one line."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def model_hash(file_hashes: dict[str, str]) -> str:
    """Identity of the base model: the graph and its weights (not the tokenizer or the manifest)."""
    lines = sorted(f"{name}:{digest}" for name, digest in file_hashes.items() if name.startswith("model.onnx"))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


@dataclass(frozen=True)
class Manifest:
    folder: Path
    data: dict

    @property
    def config(self) -> dict:
        return self.data["config"]

    @property
    def num_layers(self) -> int:
        return self.config["num_layers"]

    @property
    def max_length(self) -> int:
        return self.data["kv_cache"]["max_length"]

    @property
    def shared_kv(self) -> bool:
        """True for nomoat's graphs (past and present are one preallocated buffer); False for optimum's
        graphs, whose present is past + the new tokens."""
        return self.data["kv_cache"].get("shared_buffer", True)

    @property
    def kv_shape(self) -> list[int]:
        return self.data["kv_cache"]["shape"]

    @property
    def kv_dtype(self) -> str:
        return self.data["kv_cache"].get("dtype", "float32")

    @property
    def kv_variants(self) -> dict[str, dict]:
        """The same graph with another KV cache type, by dtype: {"int8": {"file": ...}} (a profile's kv_cache
        picks one); {} for folders exported without them."""
        return self.data["kv_cache"].get("variants", {})

    def kv_graph(self, wanted: str = "") -> tuple[str, str]:
        """(KV cache type, graph file) for a profile's kv_cache: the wanted type where this folder has its graph,
        else the export's own ("" wants the export's)."""
        variant = self.kv_variants.get(wanted) if wanted and wanted != self.kv_dtype else None
        if variant and variant.get("file") in self.data.get("files", {}):  # a file of the folder, hashed like the rest
            return wanted, variant["file"]
        return self.kv_dtype, self.data["graph"]["file"]

    def verification(self, kv_dtype: str | None = None) -> dict | None:
        """The export's agreement with its reference for the graph with this KV cache type (default: the export's
        own); None where it was not measured (no --verify, or an older export for the other graph)."""
        v = self.data.get("verification")
        if not v or kv_dtype in (None, self.kv_dtype):
            return v
        other = v.get("kv_variants", {}).get(kv_dtype)
        return {**v, **other, "kv_cache": kv_dtype} if other else None

    @property
    def embedding(self) -> dict | None:
        """Where the token embedding's rows are (format 2); None: the graph takes token ids."""
        return self.data.get("embedding")

    @property
    def expanded(self) -> dict | None:
        """Compact folders (format 3): the weights converted from GGUF rows at load (edge/expand.py)."""
        return self.data.get("expanded")

    @property
    def eos_token_ids(self) -> list[int]:
        return self.data["eos_token_ids"]

    @property
    def lora(self) -> dict:
        return self.data.get("lora") or {"rank": 0, "targets": [], "slots": []}

    @property
    def model_hash(self) -> str:
        return self.data["model_hash"]

    @property
    def name(self) -> str:
        return self.data.get("name", self.folder.name)


def read_manifest(folder: str | Path, verify_files: bool = True) -> Manifest:
    folder = Path(folder)
    if folder.is_file():  # a .gguf or safetensors file where the exported folder belongs
        raise ModelError(f"{folder} is a file, not a model folder: export it first (`nomoat export {folder} -o "
                         f"models/NAME`, on a laptop for a small board), then give models/NAME")
    if not folder.is_dir():
        raise ModelError(f"model folder not found: {folder}")
    path = folder / MANIFEST
    if not path.is_file():
        raise ModelError(f"{folder} has no {MANIFEST}: not a nomoat model folder (run `nomoat export` first)")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"unreadable {path}: {e}") from e
    version = data.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelError(f"{path} has format version {version}, this runtime reads up to {FORMAT_VERSION}: "
                         "upgrade nomoat on this device")
    m = Manifest(folder, data)
    if m.kv_dtype not in KV_DTYPES:
        raise ModelError(f"{path}: its KV cache is {m.kv_dtype}, this runtime knows {', '.join(KV_DTYPES)}: "
                         "upgrade nomoat on this device")
    if verify_files:
        verify_files_of(folder, data["files"])
    return m


def verify_files_of(folder: Path, files: dict[str, str]) -> None:
    """Check every file's sha256 against the manifest; a file whose size and mtime are those it had when it last
    matched is not hashed again (.nomoat-verified.json), so loads stay fast while a truncated, replaced or
    re-copied file is still caught."""
    stamp_file = folder / VERIFIED
    try:
        stamps = json.loads(stamp_file.read_text())
    except (OSError, ValueError):
        stamps = {}
    fresh = {}
    for name, digest in files.items():
        f = folder / name
        if not f.is_file():
            raise ModelError(f"{folder}: file {name} is missing")
        st = f.stat()
        fresh[name] = [st.st_size, st.st_mtime_ns, digest]
        if stamps.get(name) != fresh[name] and sha256_file(f) != digest:
            raise ModelError(f"{folder}: file {name} is corrupt (sha256 mismatch); re-copy or re-export it")
    if fresh != stamps:
        try:
            tmp = stamp_file.with_name(stamp_file.name + ".tmp")
            tmp.write_text(json.dumps(fresh))
            tmp.replace(stamp_file)
        except OSError:
            pass  # a read-only model folder: every load hashes
