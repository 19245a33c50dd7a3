"""The `nomoat` command line: one click group, each verb a thin call into the library.

Host verbs (export, adapter pack) import the `export` package lazily, so the device install
(no torch) still runs every other verb.
"""

from __future__ import annotations

import json
import logging
import sys
from contextlib import contextmanager
from pathlib import Path

import click

from . import __version__


def _fail(e: Exception) -> None:
    click.echo(f"error: {e}", err=True)
    sys.exit(1)


def _adapters(values: tuple[str, ...]) -> tuple[tuple[str, float], ...]:
    out = []
    for v in values:
        name, _, scale = v.partition(":")
        try:
            out.append((name, float(scale) if scale else 1.0))
        except ValueError:
            raise click.BadParameter(f"{v!r}: expected NAME[:SCALE]") from None
    return tuple(out)


@click.group()
@click.version_option(__version__)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """nomoat: LLaMA + LoRA as int4 ONNX on the devices people already own."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")


@main.command("export")
@click.argument("source")
@click.option("-o", "--output", required=True, type=click.Path(), help="Model folder to write.")
@click.option("--lora", "loras", multiple=True, metavar="DIR[:SCALE]", help="PEFT adapter to merge (repeatable).")
@click.option("--lora-slots", type=int, default=0, metavar="RANK", help="Keep run-time LoRA slots of this rank.")
@click.option("--lora-targets", default="q_proj,k_proj,v_proj,o_proj", show_default=True)
@click.option("--precision", type=click.Choice(["int4", "fp32"]), default="int4", show_default=True)
@click.option("--block-size", type=int, default=32, show_default=True)
@click.option("--accuracy-level", type=click.IntRange(0, 4), default=4, show_default=True,
              help="MatMulNBits compute: 0/1 fp32, 4 int8 activations (the runtime profile may override).")
@click.option("--fidelity", type=click.Choice(["default", "exact"]), default="default", show_default=True,
              help="exact: fp32 compute (accuracy level 1) and an fp32 lm_head: the reference token for token.")
@click.option("--lm-head", type=click.Choice(["auto", "int4", "int8", "fp32"]), default="auto", show_default=True,
              help="auto: the GGUF's own blocks, else int8.")
@click.option("--via", type=click.Choice(["builder", "optimum"]), default="builder", show_default=True,
              help="builder: nomoat's LLaMA graph (fast, GGUF blocks, LoRA slots); optimum: cross-check path.")
@click.option("--quant-method", type=click.Choice(["rtn", "rtn-asym", "k_quant", "hqq", "gptq"]), default="rtn",
              show_default=True, help="For float weights (GGUF blocks are imported as they are); see the README.")
@click.option("--max-length", type=int, default=4096, show_default=True, help="Longest context the graph supports.")
@click.option("--kv-dtype", type=click.Choice(["float32", "float16", "int8"]), default="float32", show_default=True,
              help="float16 halves the KV cache (slower attention on CPUs without fp16 arithmetic); int8 quarters "
                   "it and speeds up long contexts, with per-channel scales calibrated at export (less faithful).")
@click.option("--compact/--no-compact", default=True, show_default=True,
              help="GGUF: keep the rows of 5/6-bit and k-quant weights as in the file (a folder near the file's "
                   "size) and convert them at load, once per graph cache; --no-compact stores them converted.")
@click.option("--verify/--no-verify", default=None, help="Compare with the transformers reference (default: on).")
@click.option("--min-agreement", type=float, default=None, help="Fail verification below this top-1 agreement.")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
def export_cmd(source, output, loras, lora_slots, lora_targets, precision, block_size, accuracy_level, fidelity, lm_head,
               via, quant_method, max_length, kv_dtype, compact, verify, min_agreement, force):
    """Export SOURCE (a Hugging Face folder or a llama .gguf) to an int4 ONNX model folder."""
    try:
        from nomoat.export.builder import BuildOptions
        from nomoat.export.lora import parse_lora_arg
        from nomoat.export.pipeline import export_model
        from nomoat.export.sources import ExportError
    except ImportError as e:
        _fail(RuntimeError(f"export needs the host extras: pip install 'nomoat[export]' ({e})"))
    opts = BuildOptions(precision=precision, block_size=block_size, accuracy_level=accuracy_level, lm_head=lm_head,
                        fidelity=fidelity,
                        quant_method=quant_method, max_length=max_length, kv_dtype=kv_dtype, lora_rank=lora_slots,
                        compact=compact,
                        lora_targets=tuple(t.strip() for t in lora_targets.split(",") if t.strip()))
    try:
        export_model(source, output, opts, [parse_lora_arg(a) for a in loras], verify=verify, force=force,
                     log=click.echo, min_agreement=min_agreement, via=via)
    except ExportError as e:
        _fail(e)


@main.group()
def adapter() -> None:
    """Run-time LoRA adapters."""


@adapter.command("pack")
@click.argument("peft_dir", type=click.Path())
@click.option("--model", "model_dir", required=True, type=click.Path(), help="Model folder exported with --lora-slots.")
@click.option("-o", "--output", required=True, type=click.Path())
@click.option("--name", default=None, help="Adapter name (default: the folder name).")
@click.option("--version", "version", type=int, default=1, show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="float16 halves the file and the push; the runtime widens it to float32.")
def adapter_pack(peft_dir, model_dir, output, name, version, dtype):
    """Pack a PEFT adapter into a .onnx_adapter file for MODEL's LoRA slots."""
    from nomoat.export.packing import pack_adapter
    from nomoat.export.sources import ExportError

    from .adapters import AdapterError
    from .manifest import ModelError

    try:
        info = pack_adapter(Path(peft_dir), Path(model_dir), Path(output), name=name, version=version, dtype=dtype)
    except (ExportError, AdapterError, ModelError) as e:
        _fail(e)
    click.echo(f"wrote {output}: {info['name']} v{info['version']}, rank {info['rank']}, {dtype}, "
               f"{info['bytes'] / 1e6:.2f} MB, {len(info['slots'])} slots")


@main.command()
@click.argument("base", type=click.Path())
@click.option("--data", required=True, type=click.Path(), help="JSONL: {prompt, completion} or {messages} per line.")
@click.option("-o", "--output", required=True, type=click.Path(), help="PEFT adapter folder to write.")
@click.option("--for", "model_folder", type=click.Path(), default=None,
              help="The device's model folder (exported with --lora-slots): its tokenizer, slot targets and rank.")
@click.option("--rank", type=int, default=8, show_default=True)
@click.option("--alpha", type=float, default=None, help="LoRA alpha [default: 2 x rank].")
@click.option("--targets", default=None, help="Comma-separated [default: the --for model's slots, else q,k,v,o].")
@click.option("--epochs", type=float, default=3.0, show_default=True)
@click.option("--steps", type=int, default=0, help="Train this many steps instead of --epochs.")
@click.option("--learning-rate", "--lr", "learning_rate", type=float, default=1e-3, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--max-length", type=int, default=512, show_default=True, help="Tokens per example (longer are cut).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--eval-split", type=float, default=0.1, show_default=True, help="Share of the examples held out.")
@click.option("--samples", type=int, default=3, show_default=True,
              help="Held-out prompts answered by the base and the adapted model, side by side.")
@click.option("--preserve", type=click.Path(), default=None,
              help="JSONL of prompts whose answers must stay the base's (a training file works: its answers are "
                   "ignored). Each step also holds the adapted model to the base's next-token distributions on "
                   "them, so that adapters trained apart stack.")
@click.option("--preserve-tokens", type=int, default=64, show_default=True,
              help="For --preserve: how many tokens of the base's answer to each prompt are held.")
@click.option("--device", "train_device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="auto: a GPU when torch sees one.")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--push", is_flag=True, help="Then pack for --for, sign with --key and push to the fleet.")
@click.option("--name", default=None, help="For --push: the adapter's name [default: the output folder's].")
@click.option("--key", type=click.Path(), default=None, help="For --push: the operator's signing key.")
@click.option("--fleet", "fleet_name", default=None, help="For --push [default: config file].")
@click.option("--broker", default=None, help="For --push [default: config file].")
@click.option("--config", "config_file", default=None, envvar="NOMOAT_CONFIG", type=click.Path(),
              help="For --push: the operator's config file, as `nomoat fleet --config`.")
@click.option("--version", "version", type=int, default=None,
              help="For --push [default: one above every version of NAME the broker shows].")
@click.option("--prefix", default=None, envvar="NOMOAT_PREFIX", help="For --push: the fleet's topic prefix.")
@click.option("--activate", is_flag=True, help="For --push: make it the devices' default adapter.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="For --push: float16 halves the file and the push.")
@click.option("--chunk-size", type=click.IntRange(1, 1024 * 1024), default=128 * 1024, show_default=True)
@click.option("--expires-in", type=float, default=None, help="For --push: seconds until devices refuse it.")
@click.option("--wait-for", type=int, default=0, metavar="N", help="For --push: wait until N devices report it.")
@click.option("--timeout", type=float, default=300.0, show_default=True)
def tune(base, data, output, model_folder, rank, alpha, targets, epochs, steps, learning_rate, batch_size, max_length,
         seed, eval_split, samples, preserve, preserve_tokens, train_device, force, quiet, push, name, key, fleet_name,
         broker, config_file, version, prefix, activate, dtype, chunk_size, expires_in, wait_for, timeout):
    """Train a LoRA adapter on BASE (a Hugging Face folder or the GGUF the device model came from) with your
    examples; writes a PEFT folder that `adapter pack` and `export --lora` take as it is."""
    if push and not (model_folder and key):
        _fail(ValueError("--push needs --for MODEL_FOLDER (the adapter is packed for its slots) and --key"))
    if push:
        _adapter_name(None, None, name or Path(output).name)
    try:
        from nomoat.export.sources import ExportError
        from nomoat.export.tune import TuneOptions, format_report
        from nomoat.export.tune import tune as run_tune
    except ImportError as e:
        _fail(RuntimeError(f"tune needs the host extras: pip install 'nomoat[export]' ({e})"))
    opts = TuneOptions(rank=rank, alpha=alpha if alpha is not None else 2.0 * rank, epochs=epochs, steps=steps,
                       targets=tuple(t.strip() for t in targets.split(",") if t.strip()) if targets else (),
                       learning_rate=learning_rate, batch_size=batch_size, max_length=max_length, seed=seed,
                       eval_split=eval_split, samples=samples, device=train_device, preserve_tokens=preserve_tokens)
    try:
        report = run_tune(base, data, output, opts, model_folder, force=force, log=lambda m: click.echo(m, err=True),
                          progress=not quiet, preserve=preserve)
    except ExportError as e:
        _fail(e)
    click.echo(format_report(report, Path(output)))
    if not push:
        return
    from nomoat.export.packing import pack_adapter

    from .adapters import AdapterError
    from .client import next_version
    from .manifest import ModelError

    name = name or Path(output).name
    settings = _fleet_settings(broker, fleet_name, config_file, prefix)
    try:
        version = version if version is not None else next_version(settings, name)
        packed = Path(output) / f"{name}-v{version}.onnx_adapter"
        pack_adapter(Path(output), Path(model_folder), packed, name=name, version=version, dtype=dtype)
    except (ExportError, AdapterError, ModelError, ConnectionError, OSError) as e:
        _fail(e)
    _push_adapter(packed, name, version, Path(key), settings, activate, chunk_size=chunk_size, expires_in=expires_in,
                  wait_for=wait_for, timeout=timeout)


def _generator(model, profile, adapter_files=(), draft=None):
    from .generate import Generator
    from .profile import Profile, load_profile

    profile = profile if isinstance(profile, Profile) else load_profile(profile)
    if draft:
        profile.draft_model = draft
    gen = Generator(model, profile)
    for f in adapter_files:
        gen.load_adapter(f)
    return gen


def _fit_history(gen, history: list[dict], max_tokens: int) -> int:
    """Drop the oldest exchanges (a system message stays) until the chat leaves room for an answer of
    max_tokens (at most half the context); returns how many messages went."""
    keep = 1 if history and history[0]["role"] == "system" else 0
    room = min(max_tokens, gen.model.max_length // 2)
    dropped = 0
    while len(history) - keep > 1 and len(gen.encode(history)) + room > gen.model.max_length:
        del history[keep:keep + 2]  # the oldest user message and its answer
        dropped += 2
    return dropped


def _errors():
    from .adapters import AdapterError
    from .generate import GenerationError
    from .manifest import ModelError
    from .profile import ProfileError

    return ModelError, ProfileError, GenerationError, AdapterError


@main.command()
@click.argument("model", type=click.Path())
@click.argument("prompt")
@click.option("--max-tokens", type=int, default=128, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True)
@click.option("--top-p", type=float, default=1.0)
@click.option("--top-k", type=int, default=0)
@click.option("--min-p", type=float, default=0.0)
@click.option("--repeat-penalty", type=float, default=1.0, help="Repetition penalty (1: off).")
@click.option("--seed", type=int, default=None)
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--adapter-file", multiple=True, type=click.Path(), help=".onnx_adapter file to load (repeatable).")
@click.option("--adapter", "adapters", multiple=True, metavar="NAME[:SCALE]", help="Activate a loaded adapter.")
@click.option("--profile", default=None, help="Device profile (file or name in firmware-configs/).")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template.")
@click.option("--timings", is_flag=True, help="Print token counts and speeds (and drafted/accepted tokens) to stderr.")
@click.option("--draft-tokens", type=click.IntRange(0, 16), default=None,
              help="Speculative decoding: most drafted tokens per pass (0: off; default: the profile's, 6).")
@click.option("--draft", type=click.Path(), default=None,
              help="A smaller exported model with the same tokenizer that drafts the tokens (default: prompt lookup).")
def run(model, prompt, max_tokens, temperature, top_p, top_k, min_p, repeat_penalty, seed, stop, adapter_file, adapters,
        profile, chat, timings, draft_tokens, draft):
    """Generate a continuation of PROMPT, streamed to stdout."""
    from .sampling import SamplingParams

    try:
        gen = _generator(model, profile, adapter_file, draft)
        params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                                repetition_penalty=repeat_penalty, seed=seed)
        text = [{"role": "user", "content": prompt}] if chat else prompt
        result = None
        for piece in gen.stream(text, max_tokens=max_tokens, params=params, stop=stop, adapters=_adapters(adapters),
                                draft_tokens=draft_tokens):
            if isinstance(piece, str):
                click.echo(piece, nl=False)
            else:
                result = piece
        click.echo()
        if timings:
            click.echo(json.dumps({"usage": result.usage, "finish_reason": result.finish_reason, **result.timings}),
                       err=True)
    except _errors() as e:
        _fail(e)


@main.command()
@click.argument("model", type=click.Path())
@click.option("--max-tokens", type=int, default=512, show_default=True)
@click.option("--temperature", type=float, default=0.7, show_default=True)
@click.option("--system", default=None, help="System message.")
@click.option("--profile", default=None)
@click.option("--draft-tokens", type=click.IntRange(0, 16), default=None,
              help="Speculative decoding: most drafted tokens per pass (0: off; default: the profile's, 6).")
@click.option("--draft", type=click.Path(), default=None,
              help="A smaller exported model with the same tokenizer that drafts the tokens (default: prompt lookup).")
def chat(model, max_tokens, temperature, system, profile, draft_tokens, draft):
    """Interactive multi-turn chat (empty line or Ctrl-D to quit)."""
    from .sampling import SamplingParams

    try:
        gen = _generator(model, profile, (), draft)
    except _errors() as e:
        _fail(e)
    history = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        history.append({"role": "user", "content": line})
        try:
            if dropped := _fit_history(gen, history, max_tokens):
                click.echo(f"[the {dropped} oldest messages no longer fit the context of {gen.model.max_length} "
                           "tokens: dropped]", err=True)
            result = None
            for piece in gen.stream(history, max_tokens=max_tokens, params=SamplingParams(temperature=temperature),
                                    draft_tokens=draft_tokens):
                if isinstance(piece, str):
                    click.echo(piece, nl=False)
                else:
                    result = piece
            click.echo()
            history.append({"role": "assistant", "content": result.text})
        except _errors() as e:
            click.echo(f"error: {e}", err=True)
            history.pop()


@main.command()
@click.argument("model", type=click.Path())
@click.option("--runs", type=int, default=5, show_default=True)
@click.option("--threads", type=int, default=0, help="Override the profile's thread count.")
@click.option("--profile", default=None)
@click.option("--long-context", type=int, default=1000, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("--draft", type=click.Path(), default=None,
              help="A smaller exported model with the same tokenizer that drafts the tokens (default: prompt lookup).")
@click.option("--kv-cache", type=click.Choice(["float32", "int8"]), default=None,
              help="Override the profile's KV cache type (the export carries both graphs).")
def bench(model, runs, threads, profile, long_context, as_json, draft, kv_cache):
    """Load time, prefill, decode and long-context decode speed, peak RSS."""
    from .bench import bench_model, format_table
    from .profile import load_profile

    try:
        prof = load_profile(profile)
        if threads:
            prof.threads = threads
        if draft:
            prof.draft_model = draft
        if kv_cache:
            prof.kv_cache = kv_cache
        report = bench_model(model, prof, runs=runs, long_context=long_context)
    except _errors() as e:
        _fail(e)
    click.echo(json.dumps(report, indent=1) if as_json else format_table(report))


@main.command()
@click.option("--profile", default=None, help="Check this profile (default: the bundled one that fits best).")
@click.option("--model", type=click.Path(), default=None,
              help="Also check that this model fits the profile's memory, and measure its fidelity here.")
@click.option("--fidelity/--no-fidelity", default=True, show_default=True,
              help="With --model: run the export's reference passages here with the profile and report the top-1 "
                   "agreement this CPU's kernels keep.")
@click.option("--json", "as_json", is_flag=True)
def doctor(profile, model, fidelity, as_json):
    """What this device has (CPU features, cores, memory, onnxruntime), which profile fits, what is missing."""
    from .doctor import format_report, inspect_device, report
    from .profile import load_profile

    try:
        r = report(inspect_device(), load_profile(profile) if profile else None, model, fidelity)
    except _errors() as e:
        _fail(e)
    click.echo(json.dumps(r, indent=1) if as_json else format_report(r))
    if any(p["fatal"] for p in r["problems"]):
        sys.exit(1)


def _mqtt_options(f):
    for opt in reversed([
        click.option("--broker", default=None, envvar="NOMOAT_BROKER",
                     help="mqtt://host:port or mqtts://host:port (TLS) [default: config file, else mqtt://127.0.0.1:1883]."),
        click.option("--fleet", default=None, envvar="NOMOAT_FLEET", help="Fleet name [default: config file]."),
        click.option("--device", default=None, envvar="NOMOAT_DEVICE", help="Device name [default: config file]."),
        click.option("--profile", default=None, envvar="NOMOAT_PROFILE",
                     help="Device profile (file or name in firmware-configs/) [default: config file]."),
        click.option("--config", "config_file", default=None, envvar="NOMOAT_CONFIG", type=click.Path(),
                     help="Your config file (broker, TLS, fleet, device, keys, state) [default: "
                          "~/.config/nomoat/nomoat.toml, then /etc/nomoat/nomoat.toml]."),
    ]):
        f = opt(f)
    return f


def _profile_with(profile, broker, fleet, device, config_file=None, pick=False):
    from .config import settings

    return settings(profile, config_file, broker, fleet, device, pick)


@main.command()
@click.argument("model", type=click.Path())
@_mqtt_options
@click.option("--adapter-file", multiple=True, type=click.Path(), help=".onnx_adapter to load at start.")
@click.option("--adapter-store", default=None, type=click.Path(), help="Folder for pushed adapters.")
@click.option("--trust", multiple=True, help="Ed25519 public key (hex) allowed to sign adapter pushes.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text")
@click.option("--draft", type=click.Path(), default=None,
              help="A smaller exported model with the same tokenizer that drafts the tokens (default: prompt lookup).")
def serve(model, broker, fleet, device, profile, config_file, adapter_file, adapter_store, trust, log_format, draft):
    """Run the device daemon: prompts in over MQTT, streamed answers out, signed adapter pushes installed."""
    from .config import state_dir
    from .daemon import Daemon
    from .updater import AdapterUpdater

    try:
        prof = _profile_with(profile, broker, fleet, device, config_file, pick=True)
        prof.trusted_keys = [*prof.trusted_keys, *trust]
        gen = _generator(model, prof, adapter_file, draft)
        daemon = Daemon(gen, prof, log_json=log_format == "json")
        if prof.trusted_keys:
            # a profile's store (or the default) holds one folder per base model
            root = Path(prof.adapter_store).expanduser() if prof.adapter_store else state_dir() / "adapters"
            store = Path(adapter_store) if adapter_store else root / gen.manifest.model_hash[:16]
            AdapterUpdater(daemon, store)
    except (*_errors(), ValueError, OSError) as e:
        _fail(e)
    click.echo(f"serving {gen.manifest.name} as {prof.mqtt.fleet}/{prof.mqtt.device} on {prof.mqtt.broker}, "
               f"profile {prof.name}{' (picked for this device as nomoat doctor does)' if prof.picked else ''}, "
               f"context {prof.context_length}"
               + (f", drafts by {gen.drafter.name}" if gen.drafter else ""),
               err=True)
    try:
        daemon.serve_forever()
    except RuntimeError as e:
        _fail(e)


@main.command()
@click.argument("prompt")
@_mqtt_options
@click.option("--pool", is_flag=True, help="Send to the fleet's shared pool instead of one device.")
@click.option("--chat", is_flag=True, help="Send as a chat message (the model's template).")
@click.option("--max-tokens", type=int, default=128)
@click.option("--temperature", type=float, default=0.0)
@click.option("--repetition-penalty", type=float, default=1.0)
@click.option("--seed", type=int, default=None)
@click.option("--adapter", "adapters", multiple=True, metavar="NAME[:SCALE]")
@click.option("--timeout", type=float, default=120.0)
def ask(prompt, broker, fleet, device, profile, config_file, pool, chat, max_tokens, temperature, repetition_penalty,
        seed, adapters, timeout):
    """Send PROMPT to a device (or the fleet pool) and stream the answer."""
    from .client import ask as ask_request

    try:
        prof = _profile_with(profile, broker, fleet, device, config_file)
    except _errors() as e:
        _fail(e)
    if not pool and not prof.mqtt.device:
        _fail(ValueError("which device? Give --device (or [mqtt] device in your config file), or --pool for any "
                         "device of the fleet"))
    req = {"max_tokens": max_tokens, "temperature": temperature, "repetition_penalty": repetition_penalty,
           "adapters": [{"name": n, "scale": s} for n, s in _adapters(adapters)]}
    if seed is not None:
        req["seed"] = seed
    req.update({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})
    try:
        for msg in ask_request(prof.mqtt, req, pool=pool, timeout=timeout):
            if "delta" in msg:
                click.echo(msg["delta"], nl=False)
            elif "error" in msg:
                click.echo(f"\nerror: {msg['error']['code']}: {msg['error']['message']}", err=True)
                sys.exit(2)
            else:
                click.echo()
                click.echo(json.dumps({"finish_reason": msg["finish_reason"], "usage": msg["usage"],
                                       **msg["timings"]}), err=True)
    except (TimeoutError, ConnectionError, ValueError, OSError) as e:
        _fail(e)


@main.group()
def service() -> None:
    """Run `nomoat serve` as a systemd service."""


@service.command("install")
@click.argument("model", type=click.Path(exists=True, file_okay=False))
@click.option("--config", "config_file", default="/etc/nomoat/nomoat.toml", show_default=True,
              help="The config file the service reads (broker, fleet, device, keys).")
@click.option("-o", "--output", default="/etc/systemd/system/nomoat.service", show_default=True, type=click.Path())
@click.option("--memory-max", default="2G", show_default=True, help="systemd MemoryMax=.")
def service_install(model, config_file, output, memory_max):
    """Write the systemd unit for this venv's nomoat and MODEL (a user of its own, state in /var/lib/nomoat)."""
    import os
    import shutil

    from .manifest import read_manifest
    from .service import render

    folder = Path(model).resolve()
    try:
        read_manifest(folder, verify_files=False)
    except _errors() as e:
        _fail(e)
    nomoat = Path(sys.executable).parent / "nomoat"
    nomoat = str(nomoat) if nomoat.exists() else shutil.which("nomoat") or _fail(FileNotFoundError("no nomoat"))
    try:
        unit = render(nomoat, str(folder), config_file, memory_max)
        Path(output).write_text(unit)
    except (ValueError, OSError) as e:
        _fail(e)
    click.echo(f"wrote {output}")
    if os.stat(folder).st_mode & 0o005 != 0o005:
        click.echo(f"warning: {folder} is not readable by other users; the service's user cannot load it "
                   f"(chmod -R a+rX {folder})", err=True)
    if not Path(config_file).exists():
        click.echo(f"next: write {config_file} (broker, fleet, device: README, \"Your configuration\")", err=True)
    click.echo("then: sudo systemctl daemon-reload && sudo systemctl enable --now nomoat && journalctl -u nomoat -f")


@main.command()
@click.option("-o", "--output", required=True, type=click.Path(), help="Private key file to write (PEM).")
def keygen(output):
    """Make an Ed25519 key pair for signing adapter pushes; prints the public key to pin on devices."""
    from .fleet import generate_key

    if Path(output).exists():
        _fail(FileExistsError(f"{output} exists"))
    click.echo(generate_key(Path(output)))


@main.group()
@click.option("--prefix", default=None, envvar="NOMOAT_PREFIX",
              help="The fleet's topic prefix [default: config file, else nomoat].")
@click.option("--config", "config_file", default=None, envvar="NOMOAT_CONFIG", type=click.Path(),
              help="The operator's config file: [mqtt] broker, username, password(_file), ca_file … (as a device's).")
@click.pass_context
def fleet(ctx, prefix, config_file) -> None:
    """Operate a fleet: push, roll back, remove adapters; see device status."""
    ctx.obj = {"prefix": prefix, "config": config_file}


def _fleet_settings(broker, fleet_name, config=None, prefix=None):
    """The operator's MQTT settings: the config file's [mqtt] (credentials, TLS), then the flags (the `fleet`
    group's --config and --prefix when called under it)."""
    from .config import settings

    opts = click.get_current_context().find_object(dict) or {}
    config, prefix = config or opts.get("config"), prefix or opts.get("prefix")
    try:
        mqtt = settings(config=config, broker=broker, fleet=fleet_name).mqtt
    except _errors() as e:
        _fail(e)
    if prefix:
        mqtt.prefix = prefix
    if not mqtt.fleet or mqtt.fleet == "default" and not fleet_name:
        _fail(ValueError("which fleet? Give --fleet (or [mqtt] fleet in the config file)"))
    return mqtt


@contextmanager
def _broker_errors():
    """An operator's command that cannot reach the broker ends with its reason, not a traceback."""
    try:
        yield
    except (ConnectionError, TimeoutError, OSError) as e:
        _fail(e)


def _adapter_topic(settings, name: str) -> str:
    from .protocol import Topics

    return Topics(settings.prefix, settings.fleet, "+").adapter(name)


def _adapter_name(ctx, param, value):
    """Adapter names are a strict grammar (topic levels and folder names), checked here and on every device."""
    from .fleet import PushRejected, check_name

    try:
        return check_name(value)
    except PushRejected as e:
        raise click.BadParameter(str(e)) from None


@fleet.command("push")
@click.argument("adapter_file", type=click.Path(exists=True))
@click.option("--name", required=True, callback=_adapter_name)
@click.option("--fleet", "fleet_name", default=None, help="Fleet name [default: config file].")
@click.option("--broker", default=None, help="mqtt://host:port or mqtts://host:port [default: config file].")
@click.option("--key", required=True, type=click.Path(exists=True))
@click.option("--version", "version", type=int, default=None, help="Default: the adapter file's own version.")
@click.option("--activate", is_flag=True, help="Make it the devices' default adapter.")
@click.option("--scale", type=float, default=1.0)
@click.option("--chunk-size", type=click.IntRange(1, 1024 * 1024), default=128 * 1024, show_default=True)
@click.option("--expires-in", type=float, default=None, help="Seconds until devices refuse the manifest.")
@click.option("--wait-for", type=int, default=0, metavar="N",
              help="Wait until N devices report installed (activated with --activate) or rejected; print times.")
@click.option("--timeout", type=float, default=300.0, show_default=True, help="For --wait-for, in seconds.")
def fleet_push(adapter_file, name, fleet_name, broker, key, version, activate, scale, chunk_size, expires_in,
               wait_for, timeout):
    """Publish a signed manifest and the adapter in retained chunks."""
    _push_adapter(Path(adapter_file), name, version, Path(key), _fleet_settings(broker, fleet_name), activate, scale,
                  chunk_size, expires_in, wait_for, timeout)


def _superseded_chunks(settings, name: str, keep: int | None) -> list[tuple[str, bytes]]:
    """Empty retained messages for the chunks of the adapter version the broker's manifest of `name` names, unless
    it is version `keep`: a new order replaces that manifest, so no device will ask for those chunks again. Left
    alone, every push's chunks stayed retained on the central broker and every site broker for ever, and a site's
    bridge fetched them all again at each reconnect. (The manifest read is anyone's; at worst it names chunk topics
    of this adapter that anyone could clear.)"""
    from .client import collect_retained
    from .fleet import MAX_MANIFEST, MAX_VERSION

    topic = _adapter_topic(settings, name)
    old = collect_retained(settings, topic, 1.0).get(topic, {})
    version, chunks = old.get("version"), old.get("chunks")
    if old.get("type") != "adapter" or type(version) is not int or not 0 <= version < MAX_VERSION \
            or version == keep or not isinstance(chunks, list) or len(chunks) > MAX_MANIFEST // 64:
        return []
    return [(f"{topic}/{version}/{i}", b"") for i in range(len(chunks))]


def _adapter_meta(adapter_file: Path) -> dict:
    from .adapters import read_meta

    meta = read_meta(adapter_file)
    if "base_model_hash" not in meta:
        _fail(ValueError(f"{adapter_file} is not a nomoat adapter (use `nomoat adapter pack`)"))
    return meta


def _push_adapter(adapter_file: Path, name: str, version: int | None, key: Path, settings, activate=False,
                  scale=1.0, chunk_size=128 * 1024, expires_in=None, wait_for=0, timeout=300.0) -> None:
    """`fleet push` (and `tune --push`): sign, chunk, publish retained; with wait_for, watch the devices."""
    import time

    from .client import publish_all, push_and_watch
    from .fleet import build_push, load_key

    meta = _adapter_meta(adapter_file)
    version = version if version is not None else int(meta.get("version", 1))
    manifest, chunks = build_push(adapter_file, name, version, meta["base_model_hash"], load_key(key),
                                  chunk_size, activate, scale, time.time() + expires_in if expires_in else None)
    base = _adapter_topic(settings, name)
    messages = [(f"{base}/{version}/{i}", c) for i, c in enumerate(chunks)]
    with _broker_errors():
        stale = _superseded_chunks(settings, name, version)
    messages.append((base, json.dumps(manifest).encode()))  # manifest last: chunks are there when it lands
    wire = sum(len(topic) + len(payload) for topic, payload in messages)
    messages += stale  # cleared once the new manifest has replaced the one that named them
    summary = (f"pushed {name} v{version}: {manifest['size']} bytes in {len(chunks)} chunks "
               f"({wire} bytes of topics and payloads) to fleet {settings.fleet}"
               + (f"; cleared the {len(stale)} retained chunks of the version it replaces" if stale else ""))
    if not wait_for:
        with _broker_errors():
            publish_all(settings, messages)
        click.echo(summary)
        return
    until = "activated" if activate else "installed"
    with _broker_errors():
        events = push_and_watch(settings, messages, name, version, wait_for, until, timeout)
    click.echo(summary)
    for e in events:
        click.echo(f"  {e['device']:16s} {e['event']:10s} after {e['seconds']:.2f} s {e.get('reason', '')}")
    if len(events) < wait_for or any(e["event"] == "rejected" for e in events):
        click.echo(f"{sum(e['event'] == until for e in events)} of {wait_for} devices {until}", err=True)
        sys.exit(1)


@fleet.command("status")
@click.option("--fleet", "fleet_name", default=None, help="Fleet name [default: config file].")
@click.option("--broker", default=None, help="mqtt://host:port or mqtts://host:port [default: config file].")
@click.option("--wait", type=float, default=2.0)
def fleet_status(fleet_name, broker, wait):
    """Devices of the fleet from their retained status."""
    from .client import collect_raw, json_objects
    from .protocol import Topics

    settings = _fleet_settings(broker, fleet_name)
    # Site brokers bridged to this one (tools/mosquitto/bridge/) publish their link's state there, retained
    sites = f"{settings.prefix}/{settings.fleet}/sites/+/bridge"
    with _broker_errors():
        found = collect_raw(settings, [Topics(settings.prefix, settings.fleet, "+").status, sites], wait)
    bridges = {t.split("/")[-2]: p for t, p in found.items() if t.endswith("/bridge") and "/sites/" in t}
    statuses = json_objects({t: p for t, p in found.items() if t.endswith("/status")})
    click.echo(f"{'device':16s} {'state':8s} {'model hash':14s} {'adapters':30s} last push")
    for s in sorted(statuses.values(), key=lambda s: str(s.get("device", ""))):
        # anyone on the broker can publish a retained status: print what is there, whatever its types
        installed, last = s.get("installed"), s.get("last_push")
        adapters = ",".join(f"{n}@v{v}" for n, v in installed.items()) if isinstance(installed, dict) else ""
        last_text = f"{last.get('event')} {last.get('name')} v{last.get('version')} {last.get('reason', '')}" \
            if isinstance(last, dict) and last else "-"
        click.echo(f"{str(s.get('device', '?')):16s} {str(s.get('state', '?')):8s} "
                   f"{str(s.get('model_hash', ''))[:12]:14s} {adapters or '-':30s} {last_text}")
    for site, state in sorted(bridges.items()):
        click.echo(f"site {site}: bridge " + {b"1": "up", b"0": "down (its devices' statuses above are the last "
                                                          "ones it sent)"}.get(state, "?"))


@fleet.command("rollback")
@click.argument("name", callback=_adapter_name)
@click.option("--to-version", type=int, required=True)
@click.option("--fleet", "fleet_name", default=None, help="Fleet name [default: config file].")
@click.option("--broker", default=None, help="mqtt://host:port or mqtts://host:port [default: config file].")
@click.option("--key", required=True, type=click.Path(exists=True))
def fleet_rollback(name, to_version, fleet_name, broker, key):
    """Signed order: go back to a version the devices still have in their store."""
    _control("rollback", name, to_version, fleet_name, broker, key)


@fleet.command("remove")
@click.argument("name", callback=_adapter_name)
@click.option("--fleet", "fleet_name", default=None, help="Fleet name [default: config file].")
@click.option("--broker", default=None, help="mqtt://host:port or mqtts://host:port [default: config file].")
@click.option("--key", required=True, type=click.Path(exists=True))
def fleet_remove(name, fleet_name, broker, key):
    """Signed order: unload and delete an adapter on every device."""
    _control("remove", name, 0, fleet_name, broker, key)


def _control(action, name, version, fleet_name, broker, key):
    from .client import publish_all
    from .fleet import control_manifest, load_key

    m = control_manifest(action, name, version, load_key(Path(key)))
    settings = _fleet_settings(broker, fleet_name)
    with _broker_errors():
        stale = _superseded_chunks(settings, name, None)
        publish_all(settings, [(_adapter_topic(settings, name), json.dumps(m).encode()), *stale])
    click.echo(f"{action} {name} published to fleet {settings.fleet}"
               + (f"; cleared the {len(stale)} retained chunks of the push it replaces" if stale else ""))


if __name__ == "__main__":
    main()
