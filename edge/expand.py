"""Compact model folders: weights that the runtime converts at load from the GGUF rows they came from.

onnxruntime's CPU MatMulNBits takes 2, 4 or 8 bits, so a GGUF's 5- and 6-bit blocks run as 8-bit ones and the
k-quants' scales as fp32: stored that way, a Q4_K_M SmolLM2 folder was 139 MiB for a 101 MiB file. A compact
folder keeps those weights' GGUF rows as they are in model.onnx.data; the graph's initializers for them are
external data in EXPANDED, a file that is not in the folder. To load it, the runtime stages a scratch folder
beside its graph cache (or in the system's temporary folder): the weights file (a hard link, else a copy) and
EXPANDED, converted with the exporter's own code (edge/gguf_blocks.py). onnxruntime reads both as it reads any
model's external data, so the load's memory is that of a folder stored converted, and the scratch folder goes as
soon as the sessions are made. With a graph cache (`optimized_model_cache`, on in every bundled profile) only the
first load converts: the cached graph holds the prepacked weights.

(Handing onnxruntime the converted weights from memory instead, as in-place initializers or in-memory files, cost
120-240 MiB more peak memory on SmolLM2's loads: onnxruntime copies them, and the mapped pages count too. A
symlinked weights file is refused: "External data path escapes model directory".)

nomoat.json's "expanded" section is the recipe: per weight, the GGUF rows (type, offset, rows, bytes per row) in
row order, and the initializers made from them (packed blocks, scales, transposed minimums) with their place in
EXPANDED, plus the sha256 of EXPANDED, which the exporter checks and the runtime checks when it verifies the
folder's files.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .gguf_blocks import Blocks, gguf_blocks

SCRATCH = ".nomoat-expanded-"  # + pid + "-" + a unique suffix
EXPANDED = "model.expanded.data"  # the converted weights' external data file: staged at load, never in the folder

# an initializer made from a weight's blocks (concatenated in row order), by the name the recipe gives it
FIELDS = {
    "packed": lambda bs: np.concatenate([b.packed for b in bs]),
    "scales": lambda bs: np.concatenate([b.scales for b in bs]),
    "mins_t": lambda bs: np.concatenate([b.mins for b in bs]).T,  # [K/block, N]: the correction MatMul's weight
}


def rows_bytes(spec: dict) -> int:
    """The bytes of GGUF rows that the recipe converts (what the folder holds instead of spec["bytes"])."""
    return sum(rows * row_bytes for w in spec["weights"] for _, _, rows, row_bytes in w["parts"])


def convert(parts: list[tuple[str, np.ndarray]], outputs: dict[str, dict]) -> dict[str, np.ndarray]:
    """GGUF rows [(type, uint8 [rows, bytes per row]), ...] -> {field: array} as the recipe's outputs store it."""
    blocks: list[Blocks] = [gguf_blocks(kind, raw) for kind, raw in parts]
    return {field: np.ascontiguousarray(FIELDS[field](blocks), dtype=out["dtype"]) for field, out in outputs.items()}


def write_expanded(data_file: Path, spec: dict, out: Path, check: bool = True) -> None:
    """Write EXPANDED to `out`, converted from the weights file's GGUF rows; `check`: its sha256 against the
    recipe's. Written array by array: the converted weights are never all in memory."""
    digest, end = hashlib.sha256(), 0
    with open(data_file, "rb") as f, open(out, "wb") as o:
        for weight in spec["weights"]:
            parts = []
            for kind, offset, rows, row_bytes in weight["parts"]:
                f.seek(offset)
                raw = np.frombuffer(f.read(rows * row_bytes), np.uint8)
                if raw.size != rows * row_bytes:
                    raise ValueError(f"{data_file.name} is shorter than its manifest says (truncated?)")
                parts.append((kind, raw.reshape(rows, row_bytes)))
            arrays = convert(parts, weight["outputs"])
            for field, spot in sorted(weight["outputs"].items(), key=lambda item: item[1]["offset"]):
                a = arrays[field]
                if list(a.shape) != spot["shape"] or spot["offset"] < end:
                    raise ValueError(f"{spot['name']}: converted to {list(a.shape)} at {spot['offset']}, the "
                                     f"graph wants {spot['shape']}")
                padding = bytes(spot["offset"] - end)
                o.write(padding)
                o.write(a.data)
                if check:
                    digest.update(padding)
                    digest.update(a.data)
                end = spot["offset"] + a.nbytes
    if check and digest.hexdigest() != spec["sha256"]:
        raise ValueError(f"the weights converted from {data_file.name}'s GGUF rows differ from the exporter's "
                         "(sha256 mismatch): re-export the model")


def remove_stale_scratch(parent: Path) -> None:
    """Scratch folders left by processes that died while loading (a 1B model's is ~1 GB): their pid is in the name,
    and a folder whose process is gone is removed (one whose pid is alive, or another user's, is left alone)."""
    if os.name != "posix":
        return  # os.kill(pid, 0) would terminate the process on Windows
    for old in parent.glob(f"{SCRATCH}*-*"):
        try:
            os.kill(int(old.name[len(SCRATCH):].split("-")[0]), 0)
        except ProcessLookupError:
            shutil.rmtree(old, ignore_errors=True)
        except (ValueError, OSError):
            pass


def stage(folder: Path, spec: dict, parent: Path | None = None, check: bool = True) -> Path:
    """A scratch folder (in `parent`, else the system's temporary folder) holding the weights file and EXPANDED:
    what onnxruntime needs to load a compact folder's graph. The caller removes it once its sessions are made."""
    remove_stale_scratch(Path(parent or tempfile.gettempdir()))
    scratch = Path(tempfile.mkdtemp(prefix=f"{SCRATCH}{os.getpid()}-", dir=parent))
    try:
        data = folder / "model.onnx.data"
        try:
            os.link(data, scratch / data.name)  # same filesystem: no copy
        except OSError:
            shutil.copyfile(data, scratch / data.name)
        write_expanded(data, spec, scratch / EXPANDED, check)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return scratch
