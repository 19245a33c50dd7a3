"""`nomoat export`: checkpoint (+ LoRA) -> model folder, written atomically.

Inputs:  a Hugging Face folder (config.json + *.safetensors + tokenizer) or a llama GGUF file,
         PEFT LoRA folders to merge, optionally LoRA slots for run-time adapters.
Output:  model.onnx + model.onnx.data, tokenizer.json + tokenizer_config.json (chat template),
         nomoat.json (the manifest, see edge/manifest.py).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import onnx
from nomoat.edge.manifest import FORMAT_VERSION, KV_DTYPES, MANIFEST, model_hash, sha256_file

from . import __version__
from .builder import TARGETS, BuildOptions, LlamaBuilder
from .lora import check_against, load_adapter, merged_deltas
from .sources import ExportError, open_checkpoint


def export_model(source: str | Path, out: str | Path, opts: BuildOptions, loras: list[tuple[Path, float]] = (),
                 verify: bool | None = None, force: bool = False, log=print,
                 min_agreement: float | None = None, via: str = "builder") -> Path:
    out = Path(out)
    if out.exists() and not force:
        raise ExportError(f"output {out} exists (use --force to replace it)")
    if opts.fidelity == "exact":  # int8 activations flip near-ties; an 8-bit lm_head at level 1 is slow on x86
        opts.accuracy_level, opts.lm_head = 1, "fp32"
    if opts.quant_method == "gptq" and via != "optimum":
        raise ExportError("--quant-method gptq needs --via optimum (its calibration runs through a whole graph)")
    if opts.kv_dtype not in KV_DTYPES:
        raise ExportError(f"--kv-dtype must be one of {', '.join(KV_DTYPES)}, not {opts.kv_dtype!r}")
    for t in opts.lora_targets:
        if t not in TARGETS:
            raise ExportError(f"unknown LoRA target {t!r}; choose from {','.join(TARGETS)}")
    t0 = time.time()
    ckpt = open_checkpoint(source)
    adapters = [load_adapter(path, scale) for path, scale in loras]
    for ad in adapters:
        check_against(ad, ckpt)
    opts.deltas = merged_deltas(adapters)
    opts.max_length = min(opts.max_length, ckpt.config.max_position_embeddings)

    with folder_in_place(out) as tmp:
        save_tokenizer(source, tmp)
        if via == "optimum":
            from .via_optimum import export_via_optimum

            kinds, lora_inputs, embedding = export_via_optimum(Path(source), ckpt, opts, tmp, log), [], None
            expanded = None
        else:
            builder = LlamaBuilder(ckpt, opts, tmp / "model.onnx.data")
            model = builder.build()
            onnx.save_model(model, str(tmp / "model.onnx"))
            del model
            kinds, lora_inputs, embedding = builder.weight_kinds, builder.lora_inputs, builder.embedding
            expanded = builder.g.expanded_spec()
            if expanded:
                check_expansion(tmp, expanded)
        kv_quantization, kv_variants = None, {}
        if via == "builder" and opts.kv_dtype in ("float32", "int8"):
            # built with a float32 cache, run once to calibrate, then the int8 graph beside it: a profile picks
            from .calibrate import kv_cache_graphs

            write_manifest(tmp, ckpt, replace(opts, kv_dtype="float32"), kinds, lora_inputs, adapters, out.name, via,
                           embedding=embedding, expanded=expanded)
            kv_quantization, kv_variants = kv_cache_graphs(tmp, opts.kv_dtype)
        write_manifest(tmp, ckpt, opts, kinds, lora_inputs, adapters, out.name, via, kv_quantization, embedding,
                       expanded, kv_variants)
        log(f"exported {Path(source).name} -> {out} in {time.time() - t0:.1f}s ({_size_mb(tmp):.1f} MB)")
        log(f"  weights: {describe_weights(kinds, getattr(ckpt, 'requantized', {}))}")
        if expanded:
            from nomoat.edge.expand import rows_bytes

            log(f"  compact: {rows_bytes(expanded) / 2**20:.1f} MiB of GGUF rows kept as they are, converted at load to "
                f"{expanded['bytes'] / 2**20:.1f} MiB (once per device with a graph cache; --no-compact stores them "
                "converted)")
        if verify is None:
            verify = _has_torch()
        if verify:
            from .verify import DEFAULT_MIN_AGREEMENT, verify_export

            report = verify_export(tmp, source, loras, log=log,
                                   min_agreement=DEFAULT_MIN_AGREEMENT if min_agreement is None else min_agreement)
            # kept in the manifest so that every speed figure can be shown next to the fidelity it buys
            manifest = json.loads((tmp / MANIFEST).read_text())
            manifest["verification"] = {"top1_agreement": round(report.top1_agreement, 4),
                                        "mean_kl": round(report.mean_kl, 5), "max_abs_diff": float(report.max_abs_diff),
                                        "greedy_match": report.greedy_match, "tokens": report.tokens,
                                        "measured_on": report.measured_on, "accuracy_level": report.accuracy_level,
                                        **({"kv_variants": report.kv_variants} if report.kv_variants else {}),
                                        "reference": report.reference}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out


@contextmanager
def folder_in_place(out: Path):
    """A new folder beside `out`, readable as the umask allows, that replaces `out` when the block ends and is
    removed if it fails: a reader never sees half a model or adapter."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700: the service's user must be able to read the model
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_tokenizer(source: str | Path, folder: Path) -> None:
    """tokenizer.json + tokenizer_config.json, converted by transformers.

    transformers (and torch, which it imports) add ~500 MB that Python never gives back: unless they are
    loaded already, the conversion runs first, in a child process, so the export's peak memory is the larger
    of the two steps instead of their sum.
    """
    if "transformers" in sys.modules:
        open_checkpoint(source).save_tokenizer(folder)
        return
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(_save_tokenizer_child, str(source), str(folder)).result()


def describe_weights(kinds: dict[str, str], requantized: dict[str, str]) -> str:
    """"imported exactly: Q4_K × 182, Q6_K × 31; re-quantized …" from the builder's weight kinds."""
    exact = Counter(k.removeprefix("gguf:") for k in kinds.values() if k.startswith("gguf:"))
    other = Counter(k for k in kinds.values() if not k.startswith("gguf:"))
    parts = []
    if exact:
        parts.append("imported exactly: " + ", ".join(f"{t} × {n}" for t, n in exact.most_common()))
    if requantized:
        parts.append("re-quantized (no exact MatMulNBits layout): "
                     + ", ".join(f"{t} × {n}" for t, n in Counter(requantized.values()).most_common()))
    if other:
        parts.append(", ".join(f"{k} × {n}" for k, n in other.most_common()))
    return "; ".join(parts)


def _save_tokenizer_child(source: str, folder: str) -> None:
    open_checkpoint(source).save_tokenizer(Path(folder))


def write_manifest(folder: Path, ckpt, opts: BuildOptions, weight_kinds: dict[str, str], lora_inputs: list[dict],
                   adapters, name: str, via: str = "builder", kv_quantization: dict | None = None,
                   embedding: dict | None = None, expanded: dict | None = None,
                   kv_variants: dict | None = None) -> None:
    optimum = via == "optimum"
    c = ckpt.config
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    files = {f.name: sha256_file(f) for f in sorted(folder.iterdir()) if f.is_file() and f.name != MANIFEST}
    data = {
        "format": "nomoat-model",
        # optimum's graphs: token ids, as in version 1; 3 only for compact folders, so that older runtimes still
        # read the others
        "format_version": 1 if optimum else FORMAT_VERSION if expanded or "gguf" in (embedding or {}) else 2,
        "exporter": f"nomoat {__version__}",
        "name": name,
        "architecture": "llama",
        "config": {k: v for k, v in asdict(c).items() if k not in ("eos_token_ids",)},
        "vocab_size": c.vocab_size,
        "bos_token_id": c.bos_token_id,
        "eos_token_ids": list(c.eos_token_ids),
        "add_bos_token": tok_cfg.get("add_bos_token", False),
        "graph": {
            "file": "model.onnx",
            "kind": "optimum" if optimum else "nomoat",
            "inputs": ["input_ids", "attention_mask", "position_ids"] if optimum
            else ["inputs_embeds", "seqlens_k", "total_sequence_length", "logits_count"],
            "logits": "every position, [1, S, vocab]" if optimum else "the last logits_count positions, [1, n, vocab]",
        },
        # the token embedding's tables in the weights file, which the runtime reads rows of (edge/embedding.py)
        **({"embedding": {"file": "model.onnx.data", **embedding}} if embedding else {}),
        # compact folders: the weights that the runtime converts from GGUF rows at load (edge/expand.py)
        **({"expanded": expanded} if expanded else {}),
        "kv_cache": {
            "layout": "BNSH",
            "dtype": opts.kv_dtype,
            "shape": [1, c.num_kv_heads, opts.max_length, c.head_dim],
            "max_length": opts.max_length,
            "past": "past_key_values.{layer}.{key|value}",
            "present": "present.{layer}.{key|value}",
            "shared_buffer": not optimum,  # optimum's graphs return past + new (a concatenation)
            **({"quantization": kv_quantization} if kv_quantization else {}),
            # the same graph with another cache type (edge/profile.py: kv_cache), sharing the weights file
            **({"variants": kv_variants} if kv_variants else {}),
        },
        "lora": {
            "rank": opts.lora_rank,
            "targets": list(opts.lora_targets) if opts.lora_rank else [],
            "naming": "lora.{layer}.{target}.A [in, r] and lora.{layer}.{target}.B [r, out]; y += (x @ A) @ B",
            "slots": lora_inputs,
        },
        "quantization": {
            "precision": opts.precision,
            "block_size": opts.block_size,
            "method": opts.quant_method,
            "symmetric": opts.quant_method in ("rtn", "gptq"),
            "accuracy_level": opts.accuracy_level,
            "fidelity": opts.fidelity,
            "lm_head": opts.lm_head,
            "weights": dict(Counter(weight_kinds.values())),
            # GGUF types that no MatMulNBits layout holds exactly: dequantized, then re-quantized (type -> count)
            **({"requantized_from": dict(Counter(ckpt.requantized.values()))}
               if getattr(ckpt, "requantized", None) else {}),
        },
        "merged_adapters": [{"path": ad.path.name, "scale": ad.scale, "rank": ad.rank} for ad in adapters],
        "source": {"name": Path(ckpt.path).name, "sha256": ckpt.source_hash,
                   **({"general": ckpt.general} if getattr(ckpt, "general", None) else {})},
        "files": files,
        "model_hash": model_hash(files),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (folder / MANIFEST).write_text(json.dumps(data, indent=1))


def check_expansion(folder: Path, spec: dict) -> None:
    """The runtime's conversion of the stored GGUF rows must give the bytes the builder meant (same sha256)."""
    from nomoat.edge.expand import write_expanded

    try:
        write_expanded(folder / "model.onnx.data", spec, Path(os.devnull))
    except ValueError as e:
        raise ExportError(f"compact folder check failed: {e} (export with --no-compact)") from e


def _size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.iterdir()) / 1e6


def _has_torch() -> bool:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True
