"""`nomoat export --via optimum`: the second export path, through Hugging Face optimum's ONNX exporter.

optimum traces the transformers model itself (a different graph from builder.py: attention from
primitive ops, a KV cache that grows by concatenation, logits for every position), then the same
onnxruntime quantizer as the default path turns its MatMuls into MatMulNBits. It is an independent
cross-check of the default builder and covers what optimum supports beyond our LLaMA builder;
it keeps no LoRA slots and does not import GGUF blocks (a GGUF is dequantized first).
"""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx

from .builder import BuildOptions
from .sources import Checkpoint, ExportError


def export_via_optimum(source: Path, ckpt: Checkpoint, opts: BuildOptions, folder: Path, log) -> dict[str, str]:
    """Write model.onnx + model.onnx.data into `folder`; returns the weight kinds for the manifest."""
    try:
        from optimum.exporters.onnx import main_export
    except ImportError as e:
        raise ExportError(f"--via optimum needs optimum-onnx: pip install 'nomoat[export]' ({e})") from e
    if opts.lora_rank:
        raise ExportError("--via optimum keeps no LoRA slots; use the default builder for --lora-slots")
    if opts.kv_dtype != "float32":
        raise ExportError("--via optimum keeps optimum's float32 KV cache; --kv-dtype float16 and int8 need the builder")
    work = folder / ".optimum"
    hf = source if source.is_dir() and not opts.deltas else _hf_folder(source, opts, work / "hf")
    with warnings.catch_warnings():  # torch's tracer warns about every data-dependent branch of transformers
        warnings.simplefilter("ignore")
        main_export(str(hf), output=str(work / "onnx"), task="text-generation-with-past", do_validation=False,
                    device="cpu")
    model = onnx.load(str(work / "onnx" / "model.onnx"))
    kinds = {"optimum": "fp32"}
    if opts.precision == "int4":
        model, kinds = _quantize(model, opts, work / "onnx")
    onnx.save_model(model, str(folder / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    shutil.rmtree(work)
    log(f"optimum graph: {len(model.graph.node)} nodes, inputs {[i.name for i in model.graph.input][:3]} + KV")
    return kinds


def _hf_folder(source: Path, opts: BuildOptions, out: Path) -> Path:
    """A transformers checkpoint of the source with merged LoRA deltas (GGUF: dequantized)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": source.name} if source.suffix == ".gguf" else {}
    base = source.parent if kw else source
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, **kw)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, delta in opts.deltas.items():
            params[name] += torch.from_numpy(np.asarray(delta, np.float32))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base, **kw).save_pretrained(out)
    return out


# GPTQ's calibration text: general prose, kept apart from the verification passages (verify.py)
CALIBRATION = [
    "The history of science is the study of the development of science and scientific knowledge.",
    "Write a short poem about the sea at night, with the moon over the water.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "User: How do I make a cup of tea?\nAssistant: Boil water, pour it over the tea and wait three minutes.",
    "Mount Everest is the highest mountain above sea level, on the border of Nepal and China.",
    "In 1969 two astronauts walked on the Moon while a third orbited above them.",
    "Recipes for bread need flour, water, salt and yeast, and a warm place to rise.",
]


def _calibration(model: onnx.ModelProto, hf: Path) -> list[dict[str, np.ndarray]]:
    """GPTQ's calibration batches: each text as a fresh prompt (empty KV cache) of optimum's graph."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(hf / "tokenizer.json"))
    kv = [i for i in model.graph.input if i.name.startswith("past_key_values.")]
    batches = []
    for text in CALIBRATION:
        ids = np.array([tok.encode(text).ids], np.int64)
        batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(ids.shape[1])[None]}
        for i in kv:
            heads, dim = (d.dim_value for d in i.type.tensor_type.shape.dim[1::2])
            batch[i.name] = np.zeros((1, heads, 0, dim), np.float32)
        batches.append(batch)
    return batches


def _quantize(model: onnx.ModelProto, opts: BuildOptions, hf: Path) -> tuple[onnx.ModelProto, dict[str, str]]:
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        GPTQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    if opts.quant_method not in ("rtn", "rtn-asym", "gptq"):
        raise ExportError("--via optimum quantizes with rtn, rtn-asym or gptq")
    head = [n.name for n in model.graph.node if n.op_type == "MatMul" and "lm_head" in n.name]
    exclude = head if opts.lm_head == "fp32" else []
    symmetric = opts.quant_method != "rtn-asym"
    if opts.quant_method == "gptq":
        config = GPTQWeightOnlyQuantConfig(calibration_data_reader=_calibration(model, hf))
    else:
        config = DefaultWeightOnlyQuantConfig(block_size=opts.block_size, is_symmetric=symmetric,
                                              accuracy_level=opts.accuracy_level)
    quantizer = MatMulNBitsQuantizer(model, block_size=opts.block_size, is_symmetric=symmetric,
                                     accuracy_level=opts.accuracy_level, nodes_to_exclude=exclude, algo_config=config)
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # a line per MatMul otherwise
    quantizer.process()
    model = quantizer.model.model
    count = sum(n.op_type == "MatMulNBits" for n in model.graph.node)
    return model, {f"optimum:{n}": f"{opts.quant_method}-int4" for n in range(count)}
