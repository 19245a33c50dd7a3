#!/usr/bin/env python3
"""A copy of an exported folder without the GGUF Q4_1 correction chains: WRONG output, a timing upper bound.

Each Q4_1 linear runs as MatMulNBits plus Reshape -> ReduceSum -> MatMul(minimums) -> Add (export/builder.py:
onnxruntime's fast kernels take only integer zero points). Dropping the chains shows what they cost:

    .venv/bin/python tools/q4_1_upper_bound.py models/smollm2-135m /tmp/no-q4_1-correction
    .venv/bin/python tools/ab_decode.py models/smollm2-135m /tmp/no-q4_1-correction

Needs the `onnx` package (the export extra).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import onnx


def drop_corrections(graph: onnx.GraphProto) -> int:
    producer = {out: node for node in graph.node for out in node.output}
    drop, rename = set(), {}
    for node in graph.node:
        mins = producer.get(node.input[1]) if node.op_type == "Add" and len(node.input) == 2 else None
        if mins is not None and mins.op_type == "MatMul" and mins.input[1].endswith(".mins_t"):
            reduce = producer[mins.input[0]]
            drop |= {id(node), id(mins), id(reduce), id(producer[reduce.input[0]])}
            rename[node.output[0]] = node.input[0]  # the MatMulNBits output, uncorrected
    kept = [node for node in graph.node if id(node) not in drop]
    for node in kept:
        node.input[:] = [rename.get(name, name) for name in node.input]
    del graph.node[:]
    graph.node.extend(kept)
    return len(rename)  # chains, counted by their Add: a chunked lm_head's chunks share one block sum


def main() -> None:
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    shutil.copytree(src, dst)
    model = onnx.load(str(src / "model.onnx"), load_external_data=False)
    n = drop_corrections(model.graph)
    onnx.save(model, str(dst / "model.onnx"))  # same weights file; the minimums are simply not read
    print(f"dropped {n} Q4_1 correction chains: {dst} decodes WRONG tokens (timing only)")


if __name__ == "__main__":
    main()
