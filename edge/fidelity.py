"""How closely this device's kernels follow the export's fp32 reference, measured here.

`nomoat export --verify` runs the reference (transformers, fp32) on a few fixed passages and keeps, in nomoat.json's
"verification", the passages' token ids and the reference's top-1 choice at every position. The device runs the
same tokens teacher-forced with its own profile and counts how often its top-1 choice is the reference's.

The figure depends on the CPU, not only on the weights: at accuracy level 4 onnxruntime quantizes activations to
int8 and its kernels differ between x86 (AVX-512 VNNI) and Arm (dot-product); CPUs without those instructions
fall back to the fp32 path (level 1), which follows the reference. SmolLM2-135M Q4_1: 98.7 % on x86, 93.4 % on a
Cortex-A76 (Raspberry Pi 5), 100 % on a Cortex-A72 (Pi 4) or at level 1 (README "Fidelity per CPU").
"""

from __future__ import annotations

import numpy as np


def teacher_forced_logits(gen, ids: list[int], adapters=()) -> np.ndarray:
    """Logits at every position of `ids`, through prefill + decode_one_token (the generation loop's own path)."""
    gen.select_adapters(tuple(adapters))
    rows = [gen.prefill(ids[:1]).copy()]
    for pos in range(1, len(ids)):
        rows.append(gen.decode_one_token(ids[pos], pos).copy())
    return np.stack(rows)


def reference_of(manifest_data: dict) -> list[dict] | None:
    """The export's reference passages [{"ids": [...], "top1": [...]}, …], or None for a folder exported without
    --verify (or by an older nomoat)."""
    ref = (manifest_data.get("verification") or {}).get("reference")
    if not isinstance(ref, list) or not ref:
        return None
    for p in ref:
        if not (isinstance(p, dict) and isinstance(p.get("ids"), list) and isinstance(p.get("top1"), list)
                and len(p["ids"]) == len(p["top1"]) > 0):
            return None
    return ref


def measure(gen) -> dict | None:
    """Teacher-forced top-1 agreement of this device's runtime (its profile, its kernels) with the export's
    reference; None when the folder holds no reference."""
    ref = reference_of(gen.manifest.data)
    if ref is None:
        return None
    agree = total = 0
    for passage in ref:
        ids = passage["ids"][: gen.model.max_length]
        ours = teacher_forced_logits(gen, ids).argmax(-1)
        agree += int((ours == np.asarray(passage["top1"][: len(ids)])).sum())
        total += len(ids)
    return {"top1_agreement": round(agree / total, 4), "tokens": total, "accuracy_level": gen.model.level}
