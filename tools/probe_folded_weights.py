#!/usr/bin/env python3
"""Why 5-bit GGUF weights are stored in 8 bits: what it would cost to store them in 5 bits and let onnxruntime
expand them to MatMulNBits' 8-bit blocks while it loads the graph (constant folding of BitShift/BitwiseAnd/Concat/
Add over initializers).

    .venv/bin/python tools/probe_folded_weights.py

Builds 30 Q5-style weights of 1536 x 576 (SmolLM2's MLP shape) both ways, loads each in a fresh process and
prints the file size and the process's memory after the load. onnxruntime 1.32 keeps every folded intermediate
as an initializer until the session is closed, so the compact file costs several times its weights in memory.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

N, K, LAYERS = 1536, 576, 30
LOAD = """
import sys, numpy as np, onnxruntime as ort
ort.set_default_logger_severity(3)
rss = lambda: int([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1]) // 1024
before = rss()
so = ort.SessionOptions(); so.intra_op_num_threads = 2
s = ort.InferenceSession(sys.argv[1], so, providers=['CPUExecutionProvider'])
s.run(None, {'x': np.ones((1, int(sys.argv[2])), np.float32)})
print(rss() - before)
"""


def build(path: Path, compact: bool) -> None:
    import onnx
    from onnx import TensorProto, helper
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(0)
    nb = K // 32
    inits = [nh.from_array(np.array(v, np.uint8), n) for n, v in (("four", 4), ("m15", 15), ("m16", 16),
                                                                   ("b112", 112))]
    inits += [nh.from_array(np.arange(8, dtype=np.uint8), "shifts"), nh.from_array(np.array([N, nb, 32]), "shape")]
    nodes, outs = [], []
    for i in range(LAYERS):
        inits.append(nh.from_array(rng.random((N, nb), np.float32), f"s{i}"))
        if not compact:  # today: the 5-bit integers + 112, one byte each
            inits.append(nh.from_array(rng.integers(112, 144, (N, nb, 32), dtype=np.uint8), f"q{i}"))
            q = f"q{i}"
        else:  # 4 low bits packed two per byte, the fifth bit eight per byte, expanded by the graph
            inits += [nh.from_array(rng.integers(0, 256, (N, nb, 16), dtype=np.uint8), f"nib{i}"),
                      nh.from_array(rng.integers(0, 256, (N, nb, 4, 1), dtype=np.uint8), f"hb{i}")]
            p = f"{i}/"
            nodes += [helper.make_node("BitwiseAnd", [f"nib{i}", "m15"], [p + "lo"]),
                      helper.make_node("BitShift", [f"nib{i}", "four"], [p + "hi"], direction="RIGHT"),
                      helper.make_node("Concat", [p + "lo", p + "hi"], [p + "low4"], axis=-1),
                      helper.make_node("BitShift", [f"hb{i}", "shifts"], [p + "b"], direction="RIGHT"),
                      helper.make_node("BitShift", [p + "b", "four"], [p + "b4"], direction="LEFT"),
                      helper.make_node("BitwiseAnd", [p + "b4", "m16"], [p + "b16"]),
                      helper.make_node("Reshape", [p + "b16", "shape"], [p + "fifth"]),
                      helper.make_node("BitwiseOr", [p + "low4", p + "fifth"], [p + "q5"]),
                      helper.make_node("Add", [p + "q5", "b112"], [p + "q"])]
            q = p + "q"
        nodes.append(helper.make_node("MatMulNBits", ["x", q, f"s{i}"], [f"y{i}"], domain="com.microsoft", K=K, N=N,
                                      bits=8, block_size=32, accuracy_level=4))
        outs.append(f"y{i}")
    nodes.append(helper.make_node("Sum", outs, ["out"]))
    graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, path, save_as_external_data=True, location=path.name + ".data")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for compact in (False, True):
            path = Path(tmp) / f"{'compact' if compact else 'bytes'}.onnx"
            build(path, compact)
            grew = subprocess.run([sys.executable, "-c", LOAD, str(path), str(K)], capture_output=True, text=True,
                                  check=True).stdout.strip()
            size = (path.parent / (path.name + ".data")).stat().st_size / 2**20
            print(f"{'5 bits, expanded at load' if compact else '8 bits (today)':26s} file {size:5.1f} MiB, "
                  f"memory after load +{grew} MiB ({LAYERS * N * K / 2**20:.1f} M weights)")


if __name__ == "__main__":
    main()
