"""`nomoat tune`: train a LoRA adapter on your own examples (host side: torch + peft + transformers).

Data is JSONL, one example per line, in either of the two forms TRL's SFT trainer takes:
  {"prompt": "...", "completion": "..."}   plain text, as `nomoat run MODEL PROMPT` sends it; the loss is on the
                                            completion and the end-of-sequence token after it
  {"messages": [{"role": ..., "content": ...}, ...]}
                                            the model's chat template, as `nomoat chat` and `ask --chat` send it;
                                            the loss is on the assistant turns (with their end marker) only
Text is tokenized by the device runtime's own tokenizer and template code (edge/text.py), each part the way
the device will see it: the prompt part alone, then the part the model must write.

The loop is plain PyTorch: AdamW on the LoRA weights only, linear warm-up, cosine decay, gradient clipping.
The base is a Hugging Face folder or a GGUF file (transformers dequantizes it to fp32, as `export --verify` does).
The result is a normal PEFT folder, which `nomoat adapter pack` and `nomoat export --lora` take as it is.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from nomoat.edge.manifest import Manifest, ModelError, read_manifest
from nomoat.edge.text import Tokenizer

from .builder import TARGETS
from .pipeline import folder_in_place
from .sources import ExportError, open_checkpoint

IGNORE = -100  # the label of a token the loss does not count


@dataclass
class TuneOptions:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ()  # () = the --for model's slot targets, else q,k,v,o as `export --lora-slots`
    epochs: float = 3.0
    steps: int = 0  # > 0 overrides epochs
    learning_rate: float = 1e-3
    batch_size: int = 8
    max_length: int = 512
    seed: int = 0
    eval_split: float = 0.1  # share of the examples held out (at least one when there are 10 or more)
    samples: int = 3  # held-out prompts answered by the base and the adapted model side by side
    sample_tokens: int = 48
    device: str = "auto"
    preserve_tokens: int = 64  # --preserve: the base's answers are learned up to this many tokens


@dataclass
class Example:
    """Text parts in order, each with whether the model is trained to write it."""

    parts: list[tuple[str, bool]]
    add_eos: bool  # prompt/completion: the model learns to stop; chat: the template's end marker does it
    prompt: dict = field(default_factory=dict)  # what a client would send for it: {"prompt"} or {"messages"}
    wanted: str = ""


@dataclass
class Encoded:
    ids: list[int]
    labels: list[int]


def _json_lines(path: Path, what: str):
    """(where, value) for each non-blank line of a JSONL file, `where` being "file:line" for errors; `what` names
    the file in the error when it is missing."""
    if not path.is_file():
        raise ExportError(f"{what} file not found: {path}")
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path.name}:{n}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as e:
            raise ExportError(f"{where}: not JSON ({e.msg})") from None


def _is_messages(msgs) -> bool:
    return isinstance(msgs, list) and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                          and isinstance(m.get("content"), str) for m in msgs)


def read_examples(path: Path) -> list[dict]:
    """The JSONL file's examples, each checked; a bad line is reported with its number."""
    out = []
    for where, ex in _json_lines(path, "data"):
        if not isinstance(ex, dict):
            raise ExportError(f"{where}: expected an object with prompt/completion or messages")
        if "messages" in ex:
            msgs = ex["messages"]
            if not msgs or not _is_messages(msgs):
                raise ExportError(f"{where}: messages must be a list of {{\"role\", \"content\"}} strings")
            if not any(m["role"] == "assistant" for m in msgs):
                raise ExportError(f"{where}: no assistant message to learn")
        elif isinstance(ex.get("prompt"), str) and isinstance(ex.get("completion"), str):
            if not ex["completion"]:
                raise ExportError(f"{where}: empty completion")
        else:
            raise ExportError(f"{where}: expected \"prompt\" and \"completion\" strings, or \"messages\"")
        out.append(ex)
    if not out:
        raise ExportError(f"{path} holds no examples")
    return out


def read_prompts(path: Path) -> list[dict]:
    """--preserve's prompts: {"prompt"} or {"messages"} per line, as a client sends them. Training files work as
    they are: a completion, or the assistant turns at the end of a conversation, are left out."""
    out = []
    for where, ex in _json_lines(path, "preserve"):
        if isinstance(ex, dict) and isinstance(ex.get("prompt"), str) and ex["prompt"]:
            out.append({"prompt": ex["prompt"]})
            continue
        msgs = ex.get("messages") if isinstance(ex, dict) else None
        if not _is_messages(msgs):
            raise ExportError(f"{where}: expected a \"prompt\" string or \"messages\"")
        while msgs and msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        if not msgs:
            raise ExportError(f"{where}: no message before the assistant's answer")
        out.append({"messages": msgs})
    if not out:
        raise ExportError(f"{path} holds no prompts")
    return out


def preserved(prompt_ids_: list[int], answer: list[int], stopped: bool, eos_id: int) -> Encoded:
    """A --preserve example: the prompt, then the base's own answer (with its end, where it ended), whose positions
    are the ones held to the base's distributions."""
    answer = answer + ([eos_id] if stopped else [])
    return Encoded(prompt_ids_ + answer, [IGNORE] * len(prompt_ids_) + answer)


def to_example(ex: dict, tok: Tokenizer) -> Example:
    if "messages" not in ex:
        return Example([(ex["prompt"], False), (ex["completion"], True)], True, {"prompt": ex["prompt"]},
                       ex["completion"])
    msgs = ex["messages"]
    parts, done = [], ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = tok.chat(msgs[:i], add_generation_prompt=True)  # what the device renders as the prompt
        upto = tok.chat(msgs[: i + 1], add_generation_prompt=False)
        if not before.startswith(done) or not upto.startswith(before):
            raise ExportError("this chat template does not render a conversation as its prompt followed by the "
                              "answer, so the assistant turns cannot be told apart; use prompt/completion data")
        parts += [(before[len(done):], False), (upto[len(before):], True)]
        done = upto
    tail = tok.chat(msgs, add_generation_prompt=False)[len(done):]
    if tail:
        parts.append((tail, False))
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    return Example(parts, False, {"messages": msgs[:last]}, msgs[last]["content"])


def encode(ex: Example, tok: Tokenizer, eos_id: int, max_length: int) -> tuple[Encoded, bool]:
    """Token ids and labels; True when the example was cut at max_length."""
    ids: list[int] = []
    labels: list[int] = []
    for i, (text, trained) in enumerate(ex.parts):
        # special tokens (a BOS) only where the device adds them: at the start of a plain prompt; a chat
        # template writes its own
        part = tok.encode(text, add_special_tokens=i == 0 and ex.add_eos)
        ids += part
        labels += part if trained else [IGNORE] * len(part)
    if ex.add_eos:
        ids.append(eos_id)
        labels.append(eos_id)
    cut = len(ids) > max_length
    return Encoded(ids[:max_length], labels[:max_length]), cut


def prompt_ids(request: dict, tok: Tokenizer) -> list[int]:
    """The tokens the device feeds for a request ({"prompt"} or {"messages"})."""
    if "messages" in request:
        return tok.encode(tok.chat(request["messages"], add_generation_prompt=True), add_special_tokens=False)
    return tok.encode(request["prompt"])


def _device_tokenizer(base: Path, model_folder: Path | None, scratch: Path) -> tuple[Tokenizer, list[int]]:
    """The tokenizer the device uses: the model folder's, else the one `nomoat export` would write."""
    if model_folder is not None:
        manifest = read_manifest(model_folder, verify_files=False)
        return Tokenizer(model_folder, manifest), manifest.eos_token_ids
    ckpt = open_checkpoint(base)
    ckpt.save_tokenizer(scratch)
    cfg = json.loads((scratch / "tokenizer_config.json").read_text())
    c = ckpt.config
    manifest = Manifest(scratch, {"bos_token_id": c.bos_token_id, "add_bos_token": cfg.get("add_bos_token", False),
                                  "eos_token_ids": list(c.eos_token_ids)})
    return Tokenizer(scratch, manifest), list(c.eos_token_ids)


def slot_defaults(model_folder: Path | None, base: Path, opts: TuneOptions) -> TuneOptions:
    """Targets and rank that fit the device model's LoRA slots; an adapter that would not fit is refused here."""
    if model_folder is None:
        return opts if opts.targets else replace(opts, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    manifest = read_manifest(model_folder, verify_files=False)
    lora = manifest.lora
    if not lora.get("rank"):
        raise ExportError(f"{model_folder} was exported without LoRA slots: export it with --lora-slots RANK to "
                          "run adapters, or merge this one with `nomoat export --lora`")
    source = manifest.data.get("source") or {}
    if source.get("sha256") and source["sha256"] != open_checkpoint(base).source_hash:
        raise ExportError(f"{model_folder} was exported from {source.get('name')}, not from {base.name}: an adapter "
                          "trained on another base would not fit it")
    targets = opts.targets or tuple(lora["targets"])
    missing = [t for t in targets if t not in lora["targets"]]
    if missing:
        raise ExportError(f"{model_folder} has no LoRA slots for {','.join(missing)} (its slots: "
                          f"{','.join(lora['targets'])})")
    if opts.rank > lora["rank"]:
        raise ExportError(f"rank {opts.rank} exceeds {model_folder.name}'s slot rank {lora['rank']}")
    return replace(opts, targets=targets)


def _batches(data: list[Encoded], size: int, rng: random.Random, pad_id: int):
    """Shuffled batches, right-padded (padding is masked and never labelled)."""
    import torch

    order = list(range(len(data)))
    rng.shuffle(order)
    for i in range(0, len(order), size):
        chunk = [data[j] for j in order[i:i + size]]
        width = max(len(e.ids) for e in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, e in enumerate(chunk):
            ids[r, : len(e.ids)] = torch.tensor(e.ids)
            labels[r, : len(e.ids)] = torch.tensor(e.labels)
            mask[r, : len(e.ids)] = 1
        yield ids, labels, mask


def _labelled_logits(model, ids, labels, mask):
    """Logits where the next token is labelled, and those tokens. The lm_head (vocab x hidden, the largest matrix of
    a small model) runs only there: a chat example's system prompt and question cost no logits."""
    base = model.get_base_model()
    hidden = base.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
    target = labels[:, 1:]
    keep = target != IGNORE
    return base.lm_head(hidden[keep]).float(), target[keep]


def _loss(model, ids, labels, mask):
    """Summed cross-entropy over the labelled tokens, and their count."""
    import torch

    logits, target = _labelled_logits(model, ids, labels, mask)
    return torch.nn.functional.cross_entropy(logits, target, reduction="sum"), len(target)


def _drift(model, ids, labels, mask):
    """Mean KL divergence from the base's next-token distributions to the adapted model's, over the labelled
    positions of --preserve examples: zero where the adapter changes nothing there."""
    import torch

    with torch.no_grad(), model.disable_adapter():
        base_logits, _ = _labelled_logits(model, ids, labels, mask)
    logits, target = _labelled_logits(model, ids, labels, mask)
    log_p = torch.nn.functional.log_softmax(logits, -1)
    return torch.nn.functional.kl_div(log_p, torch.nn.functional.log_softmax(base_logits, -1), log_target=True,
                                      reduction="sum") / max(len(target), 1)


def held_out_loss(model, data: list[Encoded], batch_size: int, pad_id: int, device) -> float:
    import torch

    if not data:
        return float("nan")
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels, mask in _batches(data, batch_size, random.Random(0), pad_id):
            loss, n = _loss(model, ids.to(device), labels.to(device), mask.to(device))
            total, count = total + float(loss), count + n
    return total / max(count, 1)


def greedy(model, ids: list[int], n: int, eos: list[int], device) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids], device=device), max_new_tokens=n, do_sample=False,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                             eos_token_id=eos, pad_token_id=eos[0])
    new = out[0, len(ids):].tolist()
    return new[: next((i for i, t in enumerate(new) if t in eos), len(new))]


def greedy_batch(model, prompts: list[list[int]], n: int, eos: list[int], device, batch_size: int = 16
                 ) -> list[tuple[list[int], bool]]:
    """Greedy answers to many prompts (left-padded batches): (tokens before any end token, whether it ended)."""
    import torch

    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), eos[0], dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, p in enumerate(chunk):
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        with torch.no_grad():
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=n,
                                 do_sample=False, eos_token_id=eos, pad_token_id=eos[0])
        for row in gen[:, width:].tolist():
            end = next((j for j, t in enumerate(row) if t in eos), None)
            out.append((row[:end] if end is not None else row, end is not None))
    return out


def data_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tune(base: str | Path, data: str | Path, out: str | Path, opts: TuneOptions, model_folder: str | Path | None = None,
         force: bool = False, log=print, progress: bool = True, preserve: str | Path | None = None) -> dict:
    """Train, write the PEFT folder (with tune_report.json) atomically, return the report.

    preserve: prompts (JSONL) whose answers the adapter must leave as the base gives them. tune answers them
    with the base first, then trains on those answers beside the data: an adapter that changes only what its
    data asks for, so that adapters trained apart can be stacked."""
    import torch
    from peft import LoraConfig, get_peft_model

    from .verify import load_reference

    t0 = time.time()
    base, data, out = Path(base), Path(data), Path(out)
    model_folder = Path(model_folder) if model_folder else None
    if out.exists() and not force:
        raise ExportError(f"output {out} exists (use --force to replace it)")
    if not base.exists():
        raise ExportError(f"base model not found: {base}")
    unknown = [t for t in opts.targets if t not in TARGETS]
    if unknown:
        raise ExportError(f"unknown LoRA target {','.join(unknown)}; choose from {','.join(TARGETS)}")
    if opts.rank < 1 or opts.batch_size < 1 or opts.max_length < 2 or not 0 <= opts.eval_split < 1:
        raise ExportError("rank, batch size and max length must be positive, and the held-out share in [0, 1)")
    raw = read_examples(data)
    keep_prompts = read_prompts(Path(preserve)) if preserve else []
    try:
        opts = slot_defaults(model_folder, base, opts)
    except ModelError as e:
        raise ExportError(str(e)) from None
    device = torch.device("cuda" if opts.device == "auto" and torch.cuda.is_available() else
                          "cpu" if opts.device == "auto" else opts.device)

    scratch = Path(tempfile.mkdtemp(prefix="nomoat-tune-"))
    try:
        tok, eos = _device_tokenizer(base, model_folder, scratch)
        try:
            examples = [to_example(ex, tok) for ex in raw]
        except ModelError as e:  # no chat template
            raise ExportError(f"{data.name} has chat messages, but {e}") from None
        except ValueError as e:  # the template's raise_exception: e.g. roles out of order
            raise ExportError(f"the chat template refused an example of {data.name}: {e}") from None
        encoded, cut = [], 0
        for ex in examples:
            enc, was_cut = encode(ex, tok, eos[0], opts.max_length)
            encoded.append(enc)
            cut += was_cut
        if cut:
            log(f"warning: {cut} examples are longer than --max-length {opts.max_length} tokens and were cut")

        # the held-out split: seeded, so that before/after compare the same examples on every run
        order = list(range(len(examples)))
        random.Random(opts.seed).shuffle(order)
        n_eval = max(1, round(len(order) * opts.eval_split)) if opts.eval_split and len(order) >= 10 else 0
        eval_idx, train_idx = order[:n_eval], order[n_eval:]
        train_data = [encoded[i] for i in train_idx if any(x != IGNORE for x in encoded[i].labels[1:])]
        eval_data = [encoded[i] for i in eval_idx]
        if not train_data:
            raise ExportError(f"no example of {data.name} has a token to learn within --max-length {opts.max_length}")
        steps_per_epoch = math.ceil(len(train_data) / opts.batch_size)
        total_steps = opts.steps or max(1, math.ceil(steps_per_epoch * opts.epochs))
        log(f"tune: {len(train_data)} training and {len(eval_data)} held-out examples, "
            f"{sum(len(e.ids) for e in train_data)} tokens per epoch; {total_steps} steps of {opts.batch_size}, "
            f"LoRA rank {opts.rank} (alpha {opts.alpha:g}) on {','.join(opts.targets)}, on {device.type}")

        t_load = time.time()
        model = load_reference(base).to(device)
        load_s = time.time() - t_load
        keep: list[tuple[list[int], list[int], bool]] = []  # (prompt, the base's answer, whether it ended)
        if keep_prompts:
            t_keep = time.time()
            try:
                asked = [prompt_ids(p, tok) for p in keep_prompts]
            except ModelError as e:  # no chat template
                raise ExportError(f"{Path(preserve).name} has chat messages, but {e}") from None
            except ValueError as e:  # the template's raise_exception
                raise ExportError(f"the chat template refused a prompt of {Path(preserve).name}: {e}") from None
            answers = greedy_batch(model, asked, opts.preserve_tokens, eos, device)
            keep = [(a, ans, ended) for a, (ans, ended) in zip(asked, answers, strict=True)]
            log(f"preserve: the base answered {len(keep)} prompts of {Path(preserve).name} in "
                f"{time.time() - t_keep:.0f} s ({sum(len(k[1]) for k in keep)} tokens); each step also holds the "
                f"adapted model to the base's distributions on {min(opts.batch_size, len(keep))} of them")
        keep_data = [preserved(a, ans, ended, eos[0]) for a, ans, ended in keep]
        torch.manual_seed(opts.seed)  # the LoRA A initialisation
        config = LoraConfig(r=opts.rank, lora_alpha=opts.alpha, target_modules=list(opts.targets), lora_dropout=0.0,
                            bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
        pad_id = eos[0]

        before = held_out_loss(model, eval_data, opts.batch_size, pad_id, device)
        params = [p for p in model.parameters() if p.requires_grad]
        optim = torch.optim.AdamW(params, lr=opts.learning_rate, weight_decay=0.0)
        warmup = max(1, min(20, total_steps // 10))
        schedule = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
            1 + math.cos(math.pi * min(1.0, max(0, s - warmup) / max(1, total_steps - warmup)))))

        t_train = time.time()
        losses: list[float] = []
        drifts: list[float] = []
        rng = random.Random(opts.seed)
        keep_rng = random.Random(opts.seed + 1)
        keep_batches = iter(())
        model.train()
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, desc="tune", unit="step", disable=not progress)
        step = 0
        while step < total_steps:
            for ids, labels, mask in _batches(train_data, opts.batch_size, rng, pad_id):
                loss, n = _loss(model, ids.to(device), labels.to(device), mask.to(device))
                total = loss / max(n, 1)
                if keep_data:  # a batch of --preserve examples beside each batch of data, cycling through them
                    batch = next(keep_batches, None)
                    if batch is None:
                        keep_batches = _batches(keep_data, opts.batch_size, keep_rng, pad_id)
                        batch = next(keep_batches)
                    drift = _drift(model, *(t.to(device) for t in batch))
                    drifts.append(float(drift.detach()))
                    total = total + drift
                total.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optim.step()
                schedule.step()
                optim.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()) / max(n, 1))
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
                if step == total_steps:
                    break
        bar.close()
        train_s = time.time() - t_train
        model.eval()
        after = held_out_loss(model, eval_data, opts.batch_size, pad_id, device)

        samples = []
        for i in eval_idx[: opts.samples]:
            ids = prompt_ids(examples[i].prompt, tok)
            with model.disable_adapter():
                base_ids = greedy(model, ids, opts.sample_tokens, eos, device)
            tuned_ids = greedy(model, ids, opts.sample_tokens, eos, device)
            samples.append({**examples[i].prompt, "wanted": examples[i].wanted, "base": tok.decode(base_ids),
                            "adapted": tok.decode(tuned_ids)})

        kept = None
        if keep_data:  # teacher-forced top-1 agreement with the base on (64 of) the preserved answers' tokens
            hits = count = 0
            with torch.no_grad():
                for ids, labels, mask in _batches(keep_data[:64], opts.batch_size, random.Random(0), pad_id):
                    logits, target = _labelled_logits(model, ids.to(device), labels.to(device), mask.to(device))
                    hits, count = hits + int((logits.argmax(-1) == target).sum()), count + len(target)
            kept = hits / max(count, 1)
        report = {
            "base": base.name, "data": data.name, "data_sha256": data_hash(data),
            "for_model": model_folder.name if model_folder else None,
            "options": {**asdict(opts), "targets": list(opts.targets)},
            "examples": {"train": len(train_data), "held_out": len(eval_data), "cut": cut},
            "steps": total_steps, "held_out_loss": {"before": before, "after": after},
            "train_loss": {"first": losses[0], "last10": sum(losses[-10:]) / len(losses[-10:])},
            "seconds": {"load": round(load_s, 1), "train": round(train_s, 1), "total": 0.0},
            "device": device.type, "torch_threads": torch.get_num_threads(), "samples": samples,
            "preserve": {"file": Path(preserve).name, "prompts": len(keep),
                         "answer_tokens": sum(len(k[1]) for k in keep),
                         "drift_last10": sum(drifts[-10:]) / len(drifts[-10:]), "kept": kept} if keep else None,
        }
        with folder_in_place(out) as tmp:
            model.save_pretrained(str(tmp), save_embedding_layers=False)  # only LoRA weights: no base config check
            _note_base(tmp, base)
            report["seconds"]["total"] = round(time.time() - t0, 1)
            (tmp / "tune_report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return report


def _note_base(folder: Path, base: Path) -> None:
    """PEFT records the folder a GGUF was read from; name the file itself, so the adapter says what it fits."""
    cfg_file = folder / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["base_model_name_or_path"] = str(base)
    cfg_file.write_text(json.dumps(cfg, indent=2))


def format_report(report: dict, out: Path) -> str:
    loss = report["held_out_loss"]
    lines = []
    if report["examples"]["held_out"]:
        lines.append(f"held-out loss ({report['examples']['held_out']} examples): {loss['before']:.3f} before, "
                     f"{loss['after']:.3f} after")
    for s in report["samples"]:
        asked = s.get("prompt") or s["messages"][-1]["content"]
        lines += [f"prompt:  {asked!r}", f"  base:    {s['base']!r}", f"  adapted: {s['adapted']!r}",
                  f"  wanted:  {s['wanted']!r}"]
    if report.get("preserve"):
        p = report["preserve"]
        lines.append(f"preserve: on the base's answers to {min(p['prompts'], 64)} prompts of {p['file']}, the adapted "
                     f"model picks the base's token {p['kept']:.1%} of the time (teacher-forced top-1)")
    sec = report["seconds"]
    lines.append(f"wrote {out}: LoRA rank {report['options']['rank']} on {','.join(report['options']['targets'])}, "
                 f"{report['steps']} steps in {sec['train']:.0f} s ({sec['total']:.0f} s in all, "
                 f"{report['device']}, {report['torch_threads']} threads)")
    return "\n".join(lines)
