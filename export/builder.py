"""The LLaMA graph, built straight from the checkpoint's tensors with onnx.helper.

One function per block (embedding, attention, MLP, norm, lm_head). Fused ONNX Runtime
contrib ops do the heavy lifting:

- MatMulNBits: int4/int8 block-quantized linears (q/k/v fused into one, gate/up into one).
  GGUF blocks with a minimum (Q4_1, Q5_1, Q2_K, Q4_K, Q5_K: w = s*q + m) run as symmetric MatMulNBits plus a
  cheap correction: sum over blocks of (block-sum of x) * m, one small MatMul shared by the fused linear
  (edge/gguf_blocks.py maps every GGUF type it can onto these blocks).
- GroupQueryAttention: rotary embedding, GQA and the KV cache in one op, fed the fused [q | k | v]
  output as it is (no Split) unless LoRA slots sit on q/k/v. The cache is a
  preallocated [1, kv_heads, max_len, head_dim] buffer that the runtime binds as both past
  and present (shared buffer), so decoding never copies or grows it.
- SkipSimplifiedLayerNormalization: residual add + RMSNorm.

Compact folders (the default for GGUF sources): weights whose MatMulNBits blocks would be much larger than their
GGUF rows (5/6-bit types stored in 8 bits, k-quant scales in fp32) keep the rows in the data file, and their
initializers point into a buffer that the runtime converts at load (edge/expand.py; the recipe is in nomoat.json).

Block scales that fit half precision exactly (all of a GGUF's) are stored as fp16 and cast to fp32
in the graph; onnxruntime folds the cast at load, so the weights file is ~8 % smaller for free.

The token embedding is not in the graph: the runtime reads the rows a prompt needs from the weights
file (edge/embedding.py; where they are is in nomoat.json) and feeds their float32 values. The lm_head
(tied: over the same bytes) runs in row chunks, which keeps the peak memory of a load down (LM_HEAD_ROWS).

Graph interface (recorded in nomoat.json):
  inputs  inputs_embeds float32 [1, S, hidden], seqlens_k int32 [1] (= total length - 1),
          total_sequence_length int32 [], logits_count int64 [1], past_key_values.{i}.key/value,
          and for LoRA slots lora.{i}.{target}.A [K, r] / lora.{i}.{target}.B [r, N] (r may be 0)
  outputs logits float32 [1, n, vocab] (the last n = logits_count positions), present.{i}.key/value
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from nomoat.edge.expand import EXPANDED
from onnx import TensorProto, helper, numpy_helper

from .quantize import pack_zero_points, quantize_weight
from .sources import Checkpoint, ExportError, LlamaConfig, QuantBlocks

OPSET = 21
# The lm_head runs as MatMulNBits over chunks of this many vocabulary rows (a multiple of 4096, so that every
# chunk starts page-aligned in the data file): onnxruntime prepacks one weight at a time, with a heap copy
# beside the mapped original, so the largest weight sets the peak memory of a load.
LM_HEAD_ROWS = 12288
# A GGUF weight is stored as its rows (a compact folder) where they are under this fraction of its blocks' bytes:
# 5/6-bit types, k-quants and IQ4 (0.43-0.75); Q4_0, Q4_1 and Q8_0 blocks are within 10 % of their rows, and
# are kept as blocks (nothing to convert at load)
COMPACT_RATIO = 0.8
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class BuildOptions:
    precision: str = "int4"  # int4 | fp32
    block_size: int = 32
    accuracy_level: int = 4
    lm_head: str = "auto"  # auto | int4 | int8 | fp32
    quant_method: str = "rtn"  # for float weights: rtn | rtn-asym | k_quant | hqq (see quantize.py)
    kv_dtype: str = "float32"  # float16 halves the cache (attention in half precision); int8: see quantize_kv_cache
    fidelity: str = "default"  # exact: accuracy level 1 and an fp32 lm_head (export_model sets them)
    max_length: int = 2048  # rotary table and KV buffer limit
    lora_rank: int = 0  # 0: no LoRA slots
    compact: bool = True  # GGUF sources: keep the rows of weights whose blocks are much larger (COMPACT_RATIO)
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    # merged LoRA deltas: HF weight name -> float delta [N, K], added before quantization
    deltas: dict[str, np.ndarray] = field(default_factory=dict)


class Graph:
    """A tiny helper around onnx.helper that names things and collects initializers."""

    def __init__(self, data_file: Path, data_name: str) -> None:
        # large initializers stream straight to the external data file (page-aligned so that
        # onnxruntime can map them), so the export never holds the whole model in memory
        self.data, self.data_name = open(data_file, "wb"), data_name
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.tables: dict[str, dict] = {}  # name -> where its bytes are in the data file (see table)
        # compact folders: the weights converted at load, and the converted buffer's size and sha256 (edge/expand.py)
        self.expanded: list[dict] = []
        self.expanded_bytes = 0
        self.expanded_sha256 = hashlib.sha256()
        self._count = 0

    def init(self, name: str, array: np.ndarray, derive: tuple[dict, str] | None = None) -> str:
        """derive: (a weight's recipe from gguf_rows, field): the runtime makes this initializer from the rows."""
        array = np.ascontiguousarray(array)
        if array.nbytes < 1024:
            self.inits.append(numpy_helper.from_array(array, name))
            return name
        if derive:
            return self.derived(name, array, *derive)
        return self.view(name, self.table(name, array), 0, array.shape[0])

    def gguf_rows(self, name: str, raw: tuple[tuple[str, np.ndarray], ...]) -> dict:
        """Store a weight's GGUF rows in the data file; returns its recipe, which `derived` initializers add to."""
        return self.recipe([[kind, self.table(f"{name}.gguf{i}", r)["offset"], *r.shape]
                            for i, (kind, r) in enumerate(raw)])

    def recipe(self, parts: list[list]) -> dict:
        """A weight converted at load from stored GGUF rows: parts [[type, offset, rows, bytes per row], ...]."""
        self.expanded.append({"parts": parts, "outputs": {}})
        return self.expanded[-1]

    def derived(self, name: str, array: np.ndarray, weight: dict, field: str) -> str:
        """An initializer in the EXPANDED buffer (64-byte aligned), which the runtime converts from `weight`'s rows."""
        offset = -(-self.expanded_bytes // 64) * 64
        self.expanded_sha256.update(bytes(offset - self.expanded_bytes))  # the buffer's zero padding
        self.expanded_sha256.update(array.data)
        self.expanded_bytes = offset + array.nbytes
        weight["outputs"][field] = {"name": name, "offset": offset, "dtype": array.dtype.name, "shape": list(array.shape)}
        return self._external(name, array.dtype, list(array.shape), EXPANDED, offset, array.nbytes)

    def table(self, name: str, array: np.ndarray) -> dict:
        """Write the array's bytes to the data file (page-aligned) and say where: {offset, dtype, shape}."""
        offset = -(-self.data.tell() // 4096) * 4096
        self.data.seek(offset)
        self.data.write(np.ascontiguousarray(array).tobytes())
        self.tables[name] = {"offset": offset, "dtype": array.dtype.name, "shape": list(array.shape)}
        return self.tables[name]

    def view(self, name: str, table: dict, start: int, rows: int) -> str:
        """An initializer over rows [start, start + rows) of a stored table: the same bytes, not a copy."""
        dtype, shape = np.dtype(table["dtype"]), table["shape"]
        row_bytes = dtype.itemsize * int(np.prod(shape[1:]))
        return self._external(name, dtype, [rows, *shape[1:]], self.data_name, table["offset"] + start * row_bytes,
                              rows * row_bytes)

    def _external(self, name: str, dtype: np.dtype, dims: list[int], location: str, offset: int, length: int) -> str:
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(dtype), dims=dims)
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", offset), ("length", length)):
            t.external_data.add(key=key, value=str(value))
        self.inits.append(t)
        return name

    def expanded_spec(self) -> dict | None:
        """nomoat.json's "expanded" section (edge/expand.py), None without converted weights."""
        if not self.expanded:
            return None
        return {"file": EXPANDED, "bytes": self.expanded_bytes, "sha256": self.expanded_sha256.hexdigest(),
                "weights": self.expanded}

    def scales(self, name: str, scales: np.ndarray, derive: tuple[dict, str] | None = None) -> str:
        """Block scales, stored in half precision where that is lossless (GGUF's are fp16) and cast back
        to the fp32 that MatMulNBits takes. onnxruntime folds the Cast when it loads the graph (and the
        prepacked graph cache holds the result), so only the file shrinks: 2 bytes per block instead of 4."""
        half = half_if_lossless(scales)
        if half.dtype == scales.dtype:
            return self.init(name, scales, derive)
        return self.op("Cast", [self.init(f"{name}.f16", half, derive)], outs=[name], to=TensorProto.FLOAT)[0]

    def const(self, values, dtype=np.int64) -> str:
        self._count += 1
        return self.init(f"const.{self._count}", np.array(values, dtype=dtype))

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, name: str | None = None,
           domain: str = "", outs: list[str] | None = None, **attrs) -> list[str]:
        self._count += 1
        base = name or f"{op_type}.{self._count}"
        outs = outs or [f"{base}/out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=base, domain=domain, **attrs))
        return outs

    def op1(self, op_type: str, inputs: list[str], **kw) -> str:
        return self.op(op_type, inputs, **kw)[0]

    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "nomoat-llama", self.inputs, self.outputs, self.inits)
        opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)]
        self.data.close()
        return helper.make_model(graph, opset_imports=opsets, producer_name="nomoat")


class LlamaBuilder:
    def __init__(self, ckpt: Checkpoint, opts: BuildOptions, data_file: Path):
        self.ckpt, self.opts, self.cfg = ckpt, opts, ckpt.config
        self.g = Graph(data_file, data_file.name)
        self.lora_inputs: list[dict] = []
        self.weight_kinds: dict[str, str] = {}
        self.embedding: dict = {}  # the token lookup's tables (embedding_tables), for the manifest
        self._check_dims()

    def _check_dims(self) -> None:
        c, bs = self.cfg, self.opts.block_size
        for dim in (c.hidden_size, c.intermediate_size, c.num_heads * c.head_dim):
            if self.opts.precision != "fp32" and dim % bs:
                raise ExportError(f"dimension {dim} is not a multiple of --block-size {bs}")

    # ---- weights -------------------------------------------------------------------------
    def weight(self, name: str, bits: int | None = None) -> np.ndarray | QuantBlocks:
        """A weight as it will be stored: source blocks when exact, else quantized or float."""
        delta = self.opts.deltas.get(name)
        w = self.ckpt.tensor(name)
        if self.opts.precision == "fp32" or bits == 0:
            w = w.dequantize() if isinstance(w, QuantBlocks) else w
            return w + delta if delta is not None else w
        if isinstance(w, QuantBlocks) and delta is None and bits in (None, w.bits):
            return w  # the GGUF's own blocks: no re-quantization
        bits = bits or 4
        wf = w.dequantize() if isinstance(w, QuantBlocks) else w
        if delta is not None:
            wf = wf + delta
        # the embedding rows are dequantized in the graph with the symmetric zero point: keep them symmetric
        method = "rtn" if name in ("model.embed_tokens.weight", "lm_head.weight") else self.opts.quant_method
        return quantize_weight(wf, bits, self.opts.block_size, method)

    # ---- blocks --------------------------------------------------------------------------
    def linear_group(self, x: str, prefix: str, names: list[str], layer: int, packed: bool = False) -> list[str]:
        """y_i = x @ W_i^T for weights sharing the input x, fused into one op where they can be.

        packed: return the fused output unsplit ([y_1 | y_2 | ...], one tensor) where the weights fuse and
        no LoRA slot sits on them; otherwise the separate outputs as usual."""
        ws = [self.weight(f"{prefix}.{n}.weight") for n in names]
        for n, w in zip(names, ws, strict=True):
            self.weight_kinds[f"{prefix}.{n}"] = w.kind if isinstance(w, QuantBlocks) else "fp32"
        sizes = [w.shape[0] for w in ws]
        fusable = all(isinstance(w, np.ndarray) for w in ws) or (
            all(isinstance(w, QuantBlocks) for w in ws)
            and len({(w.bits, w.block_size, w.mins is None, w.zero_points is None) for w in ws}) == 1)
        if len(ws) > 1 and fusable:
            fused = _concat_weights(ws)
            y = self.matmul(x, fused, f"{prefix}.{'_'.join(n.split('_')[0] for n in names)}")
            if packed and not (self.opts.lora_rank and set(names) & set(self.opts.lora_targets)):
                return [y]
            outs = self.g.op("Split", [y, self.g.const(sizes)], n_out=len(ws), axis=-1)
        else:
            outs = [self.matmul(x, w, f"{prefix}.{n}") for n, w in zip(names, ws, strict=True)]
        return [self.lora_branch(x, y, layer, n, w.shape) for n, y, w in zip(names, outs, ws, strict=True)]

    def matmul(self, x: str, w: np.ndarray | QuantBlocks, name: str) -> str:
        """x @ w^T."""
        g = self.g
        if isinstance(w, np.ndarray):
            return g.op1("MatMul", [x, g.init(f"{name}.weight_t", w.T)], name=name)
        rows = self.stored_rows(name, w)
        derive = (lambda field: (rows, field)) if rows else (lambda field: None)  # noqa: E731
        return self.quantized_matmul(x, w, name, g.init(f"{name}.qweight", w.packed, derive("packed")),
                                     g.scales(f"{name}.scales", w.scales, derive("scales")), mins=derive("mins_t"))

    def stored_rows(self, name: str, w: QuantBlocks) -> dict | None:
        """The recipe of a weight that the folder keeps as GGUF rows; None: keep its blocks."""
        return self.g.gguf_rows(name, w.raw) if self.keeps_rows(w) else None

    def keeps_rows(self, w: QuantBlocks) -> bool:
        """A compact folder keeps a GGUF weight's rows where its blocks would be much larger (COMPACT_RATIO)."""
        if not self.opts.compact or not w.raw:
            return False
        blocks = w.packed.nbytes + half_if_lossless(w.scales).nbytes + (0 if w.mins is None else w.mins.nbytes)
        return sum(r.nbytes for _, r in w.raw) <= COMPACT_RATIO * blocks

    def quantized_matmul(self, x: str, w: QuantBlocks, name: str, qweight: str, scales: str,
                         block_sums: str | None = None, mins: tuple[dict, str] | None = None) -> str:
        """MatMulNBits over stored blocks (+ the Q4_1 correction, from `block_sums` of x when given);
        mins: how the correction's weight is derived (Graph.init)."""
        g = self.g
        n, k = w.shape
        inputs = [x, qweight, scales]
        if w.zero_points is not None:
            inputs.append(g.init(f"{name}.zero_points", pack_zero_points(w.zero_points)))
        y = g.op1("MatMulNBits", inputs,
                  name=name, domain="com.microsoft", K=k, N=n, bits=w.bits, block_size=w.block_size,
                  accuracy_level=self.opts.accuracy_level)
        if w.mins is None:
            return y
        # GGUF types with a minimum: + sum_b blocksum(x)_b * mins[n, b]
        corr = g.op1("MatMul", [block_sums or self.block_sums(x, w), g.init(f"{name}.mins_t", w.mins.T, mins)])
        return g.op1("Add", [y, corr])

    def block_sums(self, x: str, w: QuantBlocks) -> str:
        k = w.shape[1]
        blocks = self.g.op1("Reshape", [x, self.g.const([0, 0, k // w.block_size, w.block_size])])
        return self.g.op1("ReduceSum", [blocks, self.g.const([-1])], keepdims=0)

    def lora_branch(self, x: str, y: str, layer: int, target: str, shape: tuple[int, int]) -> str:
        if not self.opts.lora_rank or target not in self.opts.lora_targets:
            return y
        n, k = shape
        a, b = f"lora.{layer}.{target}.A", f"lora.{layer}.{target}.B"
        rank = f"rank.{layer}.{target}"  # one free dim per slot: adapters may cover different slots
        self.g.inputs += [helper.make_tensor_value_info(a, TensorProto.FLOAT, [k, rank]),
                          helper.make_tensor_value_info(b, TensorProto.FLOAT, [rank, n])]
        self.lora_inputs.append({"layer": layer, "target": target, "A": a, "B": b, "in": k, "out": n})
        delta = self.g.op1("MatMul", [self.g.op1("MatMul", [x, a]), b])
        return self.g.op1("Add", [y, delta])

    def embedding_tables(self) -> None:
        """Store the token embedding for the runtime's lookup (edge/embedding.py) and describe it in
        self.embedding: the tables' places in the data file and how a row dequantizes,
        (q - 2^(bits-1)) * scale (+ min). A tied lm_head reads the same bytes (lm_head)."""
        g, w, name = self.g, self.embed, self.embed_name
        if isinstance(w, np.ndarray):
            self.embedding = {"weight": g.table(name, w)}
            return
        self.embedding = {**self.block_tables(name, w), "bits": w.bits, "block_size": w.block_size}
        if w.mins is not None and "gguf" not in self.embedding:  # a Q4_1 lm_head has its own transposed copy
            self.embedding["mins"] = g.table(f"{name}.mins", w.mins)

    def block_tables(self, name: str, w: QuantBlocks) -> dict:
        """A [rows, ...] weight's tables, for the token lookup and the chunked lm_head: its GGUF rows in a compact
        folder (keeps_rows; the lookup and the runtime convert them), else its blocks and their scales."""
        if len(w.raw or ()) == 1 and self.keeps_rows(w):
            (kind, raw), = w.raw
            t = self.g.table(f"{name}.gguf", raw)
            return {"gguf": {"type": kind, "offset": t["offset"], "rows": raw.shape[0], "row_bytes": raw.shape[1]}}
        return {"weight": self.g.table(f"{name}.qweight", w.packed),
                "scales": self.g.table(f"{name}.scales", half_if_lossless(w.scales))}

    def attention(self, x: str, i: int) -> str:
        c, g = self.cfg, self.g
        p = f"model.layers.{i}.self_attn"
        # one [q | k | v] tensor where it can be (GroupQueryAttention splits it itself: no Split node)
        qkv = self.linear_group(x, p, ["q_proj", "k_proj", "v_proj"], i, packed=True)
        # int8 is built as float32 and turned into int8 once calibrated (quantize_kv_cache)
        kv_type = TensorProto.FLOAT16 if self.opts.kv_dtype == "float16" else TensorProto.FLOAT
        if kv_type == TensorProto.FLOAT16:  # GroupQueryAttention takes q/k/v in the cache's type
            qkv = [g.op1("Cast", [t], to=kv_type) for t in qkv]
        q, k, v = qkv if len(qkv) == 3 else (qkv[0], "", "")
        shape = [1, c.num_kv_heads, "kv_length", c.head_dim]  # the runtime sizes it (<= max_length)
        past = [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        for name in past:
            g.inputs.append(helper.make_tensor_value_info(name, kv_type, shape))
        present = [f"present.{i}.key", f"present.{i}.value"]
        attn = g.op("GroupQueryAttention", [q, k, v, *past, "seqlens_k", "total_sequence_length",
                                            "cos_cache", "sin_cache"], name=f"{p}.gqa", outs=[f"{p}.gqa/out0", *present],
                            domain="com.microsoft", num_heads=c.num_heads, kv_num_heads=c.num_kv_heads,
                    do_rotary=1, rotary_interleaved=0, scale=float(c.head_dim ** -0.5))[0]
        g.outputs += [helper.make_tensor_value_info(n, kv_type, shape) for n in present]
        if kv_type == TensorProto.FLOAT16:
            attn = g.op1("Cast", [attn], to=TensorProto.FLOAT)
        return self.linear_group(attn, p, ["o_proj"], i)[0]

    def mlp(self, x: str, i: int) -> str:
        p = f"model.layers.{i}.mlp"
        gate, up = self.linear_group(x, p, ["gate_proj", "up_proj"], i)
        act = self.g.op1("Mul", [self.g.op1("Mul", [gate, self.g.op1("Sigmoid", [gate])]), up])
        return self.linear_group(act, p, ["down_proj"], i)[0]

    def norm(self, x: str, residual: str | None, weight: str) -> tuple[str, str]:
        """RMSNorm of (x + residual); returns (normed, new residual)."""
        g, eps = self.g, self.cfg.rms_norm_eps
        gamma = g.init(weight, self.ckpt.float_tensor(weight))
        if residual is None:
            return g.op1("SimplifiedLayerNormalization", [x, gamma], epsilon=eps, axis=-1), x
        out = g.op("SkipSimplifiedLayerNormalization", [x, residual, gamma], n_out=4, domain="com.microsoft",
                   epsilon=eps)
        return out[0], out[3]

    # ---- the whole model -------------------------------------------------------------------
    def build(self) -> onnx.ModelProto:
        c, g = self.cfg, self.g
        g.inputs += [helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, [1, "sequence", c.hidden_size]),
                     helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
                     helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])]
        cos, sin = rotary_tables(c, self.opts.max_length)
        if self.opts.kv_dtype == "float16":
            cos, sin = cos.astype(np.float16), sin.astype(np.float16)
        g.init("cos_cache", cos)
        g.init("sin_cache", sin)

        self.embed_name = "model.embed_tokens"
        head_bits = self.lm_head_bits()
        # untied GGUF embeddings keep their own blocks; tied ones (and float ones) follow the lm_head
        own = not c.tie_word_embeddings and isinstance(self.ckpt.tensor("model.embed_tokens.weight"), QuantBlocks)
        self.embed = self.weight("model.embed_tokens.weight", None if own and head_bits else head_bits)
        self.weight_kinds["model.embed_tokens"] = getattr(self.embed, "kind", "fp32")
        self.embedding_tables()
        h = "inputs_embeds"

        x, residual = self.norm(h, None, "model.layers.0.input_layernorm.weight")
        for i in range(c.num_layers):
            if i:
                x, residual = self.norm(out, residual, f"model.layers.{i}.input_layernorm.weight")  # noqa: F821
            attn = self.attention(x, i)
            x, residual = self.norm(attn, residual, f"model.layers.{i}.post_attention_layernorm.weight")
            out = self.mlp(x, i)
        x, _ = self.norm(out, residual, "model.norm.weight")
        # logits for the last `logits_count` positions only: 1 for a prompt or a decode step, 1 + the drafted
        # tokens when a speculative step checks a draft (edge/speculate.py)
        g.inputs.append(helper.make_tensor_value_info("logits_count", TensorProto.INT64, [1]))
        last = g.op1("Slice", [x, g.op1("Neg", ["logits_count"]), g.const([2**62]), g.const([1])])
        g.op("Identity", [self.lm_head(last, head_bits)], outs=["logits"])
        g.outputs.insert(0, helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                          [1, "logits_count", c.vocab_size]))
        return g.model()

    def lm_head_bits(self) -> int:
        if self.opts.precision == "fp32" or self.opts.lm_head == "fp32":
            return 0
        if self.opts.lm_head == "auto":
            src = self.ckpt.tensor("model.embed_tokens.weight") if self.cfg.tie_word_embeddings else \
                self.ckpt.tensor("lm_head.weight")
            return src.bits if isinstance(src, QuantBlocks) else 8
        return {"int4": 4, "int8": 8}[self.opts.lm_head]

    def lm_head(self, x: str, bits: int) -> str:
        g = self.g
        if not self.cfg.tie_word_embeddings:
            w = self.weight("lm_head.weight", bits)
            self.weight_kinds["lm_head"] = getattr(w, "kind", "fp32")
            if isinstance(w, np.ndarray):
                return self.matmul(x, w, "lm_head")
            return self.chunked_lm_head(x, w, self.block_tables("lm_head", w))
        if isinstance(self.embed, np.ndarray):  # float and tied: Gemm reads the embedding transposed, no copy
            table = g.view(self.embed_name, self.embedding["weight"], 0, self.cfg.vocab_size)
            x2 = g.op1("Reshape", [x, g.const([-1, self.cfg.hidden_size])])
            y = g.op1("Gemm", [x2, table], name="lm_head", transB=1)
            return g.op1("Reshape", [y, g.const([1, -1, self.cfg.vocab_size])])
        return self.chunked_lm_head(x, self.embed, self.embedding)

    def chunked_lm_head(self, x: str, w: QuantBlocks, tables: dict) -> str:
        """MatMulNBits over LM_HEAD_ROWS-row chunks of the stored blocks (views, not copies), concatenated.
        Logits as one node's; the load's peak memory lower (the 1B model's 100 MB lm_head: 1268 -> 1090 MiB)."""
        g, n = self.g, w.shape[0]
        sums = self.block_sums(x, w) if w.mins is not None else None  # shared by the chunks
        outs = []
        for start in range(0, n, LM_HEAD_ROWS):
            rows = min(LM_HEAD_ROWS, n - start)
            name = "lm_head" if rows == n else f"lm_head.{start // LM_HEAD_ROWS}"
            if "gguf" in tables:  # a compact folder: each chunk converted at load from its rows of the table
                src, chunk = tables["gguf"], w.take_rows(np.arange(start, start + rows))
                recipe = g.recipe([[src["type"], src["offset"] + start * src["row_bytes"], rows, src["row_bytes"]]])
                outs.append(self.quantized_matmul(
                    x, chunk, name, g.init(f"{name}.qweight", chunk.packed, (recipe, "packed")),
                    g.scales(f"{name}.scales", chunk.scales, (recipe, "scales")), sums, mins=(recipe, "mins_t")))
                continue
            scales = g.view(f"{name}.scales", tables["scales"], start, rows)
            if tables["scales"]["dtype"] == "float16":
                scales = g.op1("Cast", [scales], to=TensorProto.FLOAT)
            chunk = w.take_rows(np.arange(start, start + rows))
            outs.append(self.quantized_matmul(x, chunk, name, g.view(f"{name}.qweight", tables["weight"], start, rows),
                                              scales, sums))
        return outs[0] if len(outs) == 1 else g.op1("Concat", outs, axis=-1)


def half_if_lossless(a: np.ndarray) -> np.ndarray:
    """The array in float16 when that keeps every value (a GGUF's block scales), else as it is."""
    half = a.astype(np.float16)
    return half if np.array_equal(half.astype(a.dtype), a) else a


def quantize_kv_cache(model: onnx.ModelProto, k_scales: np.ndarray, v_scales: np.ndarray) -> None:
    """Turn a built graph's float32 KV cache into int8, in place: GroupQueryAttention stores
    clip(round(x / scale), -128, 127) per (kv head, channel) and reads x back as q * scale.

    A quarter of the fp32 cache's memory and bandwidth, so long contexts decode faster; the scales are
    static ([layers, kv_heads, head_dim], calibrated by export/calibrate.py), as onnxruntime's CPU kernel
    takes them."""
    graph = model.graph
    for node in graph.node:
        if node.op_type != "GroupQueryAttention":
            continue
        layer = int(node.name.split(".")[2])  # model.layers.{i}.self_attn.gqa
        inputs = list(node.input) + [""] * (14 - len(node.input))
        inputs[12:14] = [f"{node.name}.k_scale", f"{node.name}.v_scale"]  # the op's k_scale / v_scale slots
        for name, scale in zip(inputs[12:14], (k_scales[layer], v_scales[layer]), strict=True):
            graph.initializer.append(numpy_helper.from_array(scale[:, None, :].astype(np.float32), name))
        del node.input[:]
        node.input.extend(inputs)
        node.attribute.extend([helper.make_attribute("kv_cache_bit_width", 8),
                               helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                               helper.make_attribute("v_quant_type", "PER_CHANNEL")])
    for value in [*graph.input, *graph.output]:
        if value.name.startswith(("past_key_values.", "present.")):
            value.type.tensor_type.elem_type = TensorProto.INT8


def _concat_weights(ws: list) -> np.ndarray | QuantBlocks:
    if isinstance(ws[0], np.ndarray):
        return np.concatenate(ws, axis=0)
    w0 = ws[0]
    cat = lambda attr: None if getattr(w0, attr) is None else np.concatenate([getattr(w, attr) for w in ws])  # noqa: E731
    raw = sum((w.raw for w in ws), ()) if all(w.raw for w in ws) else None
    return QuantBlocks(w0.bits, w0.block_size, cat("packed"), cat("scales"), cat("zero_points"), cat("mins"), w0.kind,
                       raw)


def rotary_tables(c: LlamaConfig, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_length, head_dim/2] with the same inverse frequencies as transformers."""
    inv_freq = 1.0 / (c.rope_theta ** (np.arange(0, c.head_dim, 2, dtype=np.float64) / c.head_dim))
    s = c.rope_scaling
    if s and s.get("rope_type") == "linear":  # positions divided by the factor
        inv_freq = inv_freq / s["factor"]
    elif s:  # llama3 frequency-dependent scaling
        factor, lo, hi = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
        old = s["original_max_position_embeddings"]
        wavelen = 2 * np.pi / inv_freq
        smooth = (old / wavelen - lo) / (hi - lo)
        scaled = np.where(wavelen > old / lo, inv_freq / factor, inv_freq)
        mid = (wavelen <= old / lo) & (wavelen >= old / hi)
        inv_freq = np.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    if c.rope_freq_factors:  # a GGUF's rope_freqs: llama.cpp divides each frequency by its factor
        inv_freq = inv_freq / np.asarray(c.rope_freq_factors, dtype=np.float64)
    angles = np.outer(np.arange(max_length, dtype=np.float64), inv_freq).astype(np.float32)
    return np.cos(angles), np.sin(angles)
