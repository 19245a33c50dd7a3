"""The token embedding lookup: the rows a prompt needs, read from the weights file with pread.

The graph takes embeddings, not token ids (model format 2). Had onnxruntime gathered rows from its memory
map of the table, every row read would map the 64 KiB around it (the kernel's fault-around), and a thousand
varied tokens leave most of the table (28 MiB for SmolLM2) in this process's RSS; pread copies just the row
out of the page cache. Rows dequantize as the exporter stored them: (q - 2^(bits-1)) * scale (+ min), in
float32, the arithmetic the graph's own lookup did. A compact folder keeps the GGUF rows themselves ("gguf"):
they are converted to those blocks first, with the exporter's own code (edge/gguf_blocks.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .gguf_blocks import gguf_blocks


class _Table:
    """One [rows, ...] array at an offset of an open file."""

    def __init__(self, file, spec: dict):
        self.file, self.offset = file, spec["offset"]
        if "row_bytes" in spec:  # GGUF rows: bytes
            spec = {**spec, "dtype": "uint8", "shape": [spec["rows"], spec["row_bytes"]]}
        self.dtype, self.row_shape = np.dtype(spec["dtype"]), tuple(spec["shape"][1:])
        self.row_bytes = int(np.prod(self.row_shape)) * self.dtype.itemsize

    def rows(self, ids: list[int]) -> np.ndarray:
        n, fd = self.row_bytes, self.file.fileno()
        data = b"".join(_pread(self.file, fd, n, self.offset + i * n) for i in ids)
        if len(data) != n * len(ids):
            raise ValueError(f"{self.file.name} is shorter than its manifest says (truncated?)")
        return np.frombuffer(data, self.dtype).reshape(len(ids), *self.row_shape)


def _pread(file, fd: int, n: int, offset: int) -> bytes:
    if hasattr(os, "pread"):
        return os.pread(fd, n, offset)
    file.seek(offset)  # Windows: no pread (one generator uses its lookup from one thread at a time)
    return file.read(n)


class TokenEmbedding:
    def __init__(self, folder: Path, spec: dict, vocab: int, hidden: int):
        self.vocab, self.hidden = vocab, hidden
        self.file = open(Path(folder) / spec["file"], "rb", buffering=0)
        self.gguf = spec["gguf"]["type"] if "gguf" in spec else None
        self.weight = _Table(self.file, spec["gguf"] if self.gguf else spec["weight"])
        self.bits, self.block_size = spec.get("bits"), spec.get("block_size")
        self.scales = _Table(self.file, spec["scales"]) if spec.get("scales") else None
        self.mins = _Table(self.file, spec["mins"]) if spec.get("mins") else None

    def __call__(self, ids: list[int]) -> np.ndarray:
        """float32 [len(ids), hidden]."""
        if any(not 0 <= i < self.vocab for i in ids):
            raise ValueError(f"token id out of range (vocabulary {self.vocab})")
        w = self.weight.rows(ids)
        if self.bits is None:
            return w.astype(np.float32).reshape(len(ids), self.hidden)
        mins = self.mins.rows(ids) if self.mins is not None else None
        if self.gguf:
            blocks = gguf_blocks(self.gguf, w)
            w, scales, mins = blocks.packed, blocks.scales, blocks.mins
        else:
            scales = self.scales.rows(ids)
        if self.bits == 4:  # two per byte, the low nibble first
            w = np.stack([w & 15, w >> 4], axis=-1)
        q = w.reshape(len(ids), -1, self.block_size).astype(np.float32) - np.float32(2 ** (self.bits - 1))
        x = q * scales.astype(np.float32)[..., None]
        if mins is not None:
            x += mins.astype(np.float32)[..., None]
        return x.reshape(len(ids), self.hidden)

    def close(self) -> None:
        self.file.close()
