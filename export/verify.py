"""Compare an exported model folder with the transformers reference of the same weights.

The reference is transformers' LlamaForCausalLM on the source (a GGUF is dequantized by
transformers itself), with LoRA adapters merged by PEFT: independent of nomoat's own merge.
The export runs through the device runtime (edge.Generator): prefill, then one token at a
time through the KV cache, exactly as on a device.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from nomoat.edge.fidelity import teacher_forced_logits

from .sources import ExportError

PASSAGES = [
    "The capital of France is Paris. It is known for the Eiffel Tower, the Louvre museum and its cafes, "
    "and the river Seine flows through the middle of the city.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
]
GREEDY_PROMPT = "The capital of France is"
# int4 must keep the reference's choice on most tokens. 0.8 separates a faithful export
# (GGUF blocks imported: >= 0.87 on SmolLM2) from a broken one (a wrong layout or scale gives < 0.1);
# plain re-quantization of SmolLM2 measures 0.5-0.66 and passes only with --min-agreement lowered.
DEFAULT_MIN_AGREEMENT = 0.8


@dataclass
class Report:
    top1_agreement: float
    mean_kl: float
    max_abs_diff: float
    greedy_reference: str
    greedy_export: str
    tokens: int
    # the passages' token ids and the reference's top-1 choice at each position, kept in nomoat.json so that a
    # device can measure its own agreement (edge/fidelity.py, `nomoat doctor --model`)
    reference: list[dict]
    measured_on: str
    accuracy_level: int
    # the same passages through the export's other KV cache graph, by dtype: {top1_agreement, mean_kl}
    kv_variants: dict

    @property
    def greedy_match(self) -> bool:
        return self.greedy_reference == self.greedy_export


def load_reference(source: str | Path, loras: list[tuple[Path, float]] = ()):
    import torch
    from transformers import AutoModelForCausalLM

    source = Path(source)
    kw = {"torch_dtype": torch.float32}
    if source.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, **kw)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(source), **kw)
    if loras:
        from peft import PeftModel

        for i, (path, scale) in enumerate(loras):
            model = PeftModel.from_pretrained(model, str(path), adapter_name=f"a{i}")
            if scale != 1.0:
                for name, p in model.named_parameters():
                    if f"lora_B.a{i}" in name:
                        p.data *= scale
            model = model.merge_and_unload()
    return model.eval()


def reference_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def compare(ref: np.ndarray, out: np.ndarray) -> tuple[float, float, float]:
    agree = float((ref.argmax(-1) == out.argmax(-1)).mean())
    lp = ref - ref.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    lq = out - out.max(-1, keepdims=True)
    lq = lq - np.log(np.exp(lq).sum(-1, keepdims=True))
    kl = float((np.exp(lp) * (lp - lq)).sum(-1).mean())
    return agree, kl, float(np.abs(ref - out).max())


def greedy_reference(model, ids: list[int], n: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long), pad_token_id=0)
    return out[0, len(ids):].tolist()


def verify_folder(folder: Path, reference, greedy_tokens: int = 12) -> Report:
    from nomoat.edge.doctor import inspect_device
    from nomoat.edge.generate import Generator
    from nomoat.edge.profile import Profile

    gen = Generator(folder, verify_files=False)
    refs, outs, passages = [], [], []
    for text in PASSAGES:
        ids = gen.tokenizer.encode(text)[:64]
        passages.append(ids)
        refs.append(reference_logits(reference, ids))
        outs.append(teacher_forced_logits(gen, ids))
    ref = np.concatenate(refs)
    agree, kl, diff = compare(ref, np.concatenate(outs))
    prompt = gen.tokenizer.encode(GREEDY_PROMPT)
    ref_ids = greedy_reference(reference, prompt, greedy_tokens)
    eos = set(gen.manifest.eos_token_ids)
    ref_ids = ref_ids[: next((i for i, t in enumerate(ref_ids) if t in eos), len(ref_ids))]
    ours = gen.generate(prompt, max_tokens=greedy_tokens).tokens
    reference = [{"ids": list(map(int, i)), "top1": r.argmax(-1).tolist()} for i, r in zip(passages, refs, strict=True)]
    greedy, level, others = gen.tokenizer.decode(ref_ids), gen.model.level, list(gen.manifest.kv_variants)
    greedy_ours = gen.tokenizer.decode(ours)
    del gen  # one model's weights in memory at a time (a 1B export's peak)
    variants = {}
    for dtype in others:  # what a profile's kv_cache would run instead
        other = Generator(folder, Profile(kv_cache=dtype), verify_files=False)
        a, k, _ = compare(ref, np.concatenate([teacher_forced_logits(other, ids) for ids in passages]))
        variants[dtype] = {"top1_agreement": round(a, 4), "mean_kl": round(k, 5)}
        del other
    device = inspect_device()
    return Report(agree, kl, diff, greedy, greedy_ours, len(ref), reference, f"{device.machine}, {device.cpu}", level,
                  variants)


def verify_export(folder: Path, source, loras=(), min_agreement: float = DEFAULT_MIN_AGREEMENT,
                  log=print) -> Report:
    import json

    precision = json.loads((folder / "nomoat.json").read_text())["quantization"]["precision"]
    report = verify_folder(folder, load_reference(source, loras))
    log(f"verify ({report.tokens} teacher-forced tokens): top-1 agreement {report.top1_agreement:.1%}, "
        f"mean KL {report.mean_kl:.4f}, max |logit diff| {report.max_abs_diff:.2e}")
    log(f"  greedy reference: {report.greedy_reference!r}")
    log(f"  greedy export:    {report.greedy_export!r} ({'match' if report.greedy_match else 'differs'})")
    for dtype, v in report.kv_variants.items():
        log(f"  with kv_cache = {dtype!r} (profile or config): top-1 agreement {v['top1_agreement']:.1%}, "
            f"mean KL {v['mean_kl']:.4f}")
    if precision == "fp32" and report.max_abs_diff > 1e-3:
        raise ExportError(f"fp32 export differs from the reference (max |logit diff| {report.max_abs_diff:.2e} > 1e-3)")
    if report.top1_agreement < min_agreement:
        raise ExportError(f"export keeps only {report.top1_agreement:.1%} top-1 agreement with the reference "
                          f"(< {min_agreement:.0%}); see --min-agreement")
    return report
