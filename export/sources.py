"""Read a LLaMA-family checkpoint lazily: a Hugging Face folder (safetensors) or a GGUF file.

Every tensor is returned under its Hugging Face name, in Hugging Face layout, one at a time,
so that peak memory stays near one layer above the output. GGUF tensors that are already
quantized in a block format that MatMulNBits can run exactly (Q4_0/1, Q5_0/1, Q8_0, the k-quants Q2_K-Q6_K,
IQ4_NL, IQ4_XS: edge/gguf_blocks.py) come back as `QuantBlocks` without being re-quantized; every other
GGUF type (the 1-3 bit IQ codebooks, TQ, MXFP4 …) is dequantized to fp32 and re-quantized.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from nomoat.edge.manifest import sha256_file


class ExportError(Exception):
    """A problem with the user's input, reported as one line."""


@dataclass(frozen=True)
class LlamaConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    rope_scaling: dict | None = None
    # a GGUF's rope_freqs tensor (Llama 3.x files): each rotary frequency is divided by its factor, as llama.cpp
    # does; llama.cpp's converter writes it from the llama3 rope_scaling of the Hugging Face config
    rope_freq_factors: tuple[float, ...] | None = None


@dataclass
class QuantBlocks:
    """A weight [N, K] already in MatMulNBits layout.

    weight[n, k] = scales[n, b] * (q[n, k] - zero_point) + mins[n, b], with b = k // block_size,
    zero_point = 2**(bits-1) (symmetric) unless `zero_points` (packed uint8) is given, and
    mins only for GGUF Q4_1-style blocks.
    """

    bits: int
    block_size: int
    packed: np.ndarray  # uint8 [N, K/block, block*bits/8]
    scales: np.ndarray  # float32 [N, K/block]
    zero_points: np.ndarray | None = None  # uint8 [N, K/block], one per block, unpacked
    mins: np.ndarray | None = None  # float32 [N, K/block]
    kind: str = ""  # where it came from, e.g. "gguf:Q4_1" or "rtn"
    # the GGUF rows these blocks were converted from, row for row: ((type, uint8 [rows, bytes per row]), ...);
    # a compact folder stores these and the runtime converts them at load (edge/expand.py)
    raw: tuple[tuple[str, np.ndarray], ...] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * self.block_size

    def take_rows(self, rows: np.ndarray) -> QuantBlocks:
        """The same weight with its output rows reordered (rows are independent blocks)."""
        pick = lambda a: None if a is None else np.ascontiguousarray(a[rows])  # noqa: E731
        raw = None
        if self.raw and len({kind for kind, _ in self.raw}) == 1:
            raw = ((self.raw[0][0], pick(np.concatenate([r for _, r in self.raw]))),)
        return QuantBlocks(self.bits, self.block_size, pick(self.packed), pick(self.scales),
                           pick(self.zero_points), pick(self.mins), self.kind, raw)

    def dequantize(self) -> np.ndarray:
        q = unpack_nibbles(self.packed) if self.bits == 4 else self.packed
        n, nb, _ = self.packed.shape
        q = q.reshape(n, nb, self.block_size).astype(np.float32)
        zp = 2 ** (self.bits - 1) if self.zero_points is None else self.zero_points[:, :, None].astype(np.float32)
        w = (q - zp) * self.scales[:, :, None]
        if self.mins is not None:
            w += self.mins[:, :, None]
        return w.reshape(n, nb * self.block_size)


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """MatMulNBits 4-bit packing: byte j holds element 2j (low nibble) and 2j+1 (high)."""
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), dtype=np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out


class Checkpoint:
    """Common interface: `config`, `tensor(name)`, `has(name)`, `source_hash`, `save_tokenizer(dir)`."""

    config: LlamaConfig
    source_hash: str
    path: Path

    def has(self, name: str) -> bool:
        raise NotImplementedError

    def tensor(self, name: str) -> np.ndarray | QuantBlocks:
        raise NotImplementedError

    def float_tensor(self, name: str) -> np.ndarray:
        t = self.tensor(name)
        return t.dequantize() if isinstance(t, QuantBlocks) else t

    def save_tokenizer(self, out: Path) -> None:
        raise NotImplementedError


def open_checkpoint(source: str | Path) -> Checkpoint:
    path = Path(source)
    if not path.exists():
        raise ExportError(f"source not found: {path}")
    if path.is_file() and path.suffix == ".gguf":
        return GGUFCheckpoint(path)
    if path.is_dir():
        return HFCheckpoint(path)
    raise ExportError(f"unsupported source {path}: expected a Hugging Face folder or a .gguf file")


def _llama_from_hf_config(cfg: dict, where: Path) -> LlamaConfig:
    arch = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    if arch not in ("llama", "mistral") and not any(a in ("LlamaForCausalLM", "MistralForCausalLM") for a in archs):
        raise ExportError(f"unsupported architecture {arch or archs} in {where}: nomoat exports LLaMA-family models")
    heads = cfg["num_attention_heads"]
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    scaling = cfg.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type")) not in ("llama3", "linear", "default"):
        raise ExportError(f"unsupported rope_scaling {scaling} in {where}")
    if cfg.get("sliding_window"):
        raise ExportError("sliding-window attention is not supported")
    return LlamaConfig(
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        vocab_size=cfg["vocab_size"],
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids,
        rope_scaling=({**scaling, "rope_type": scaling.get("rope_type", scaling.get("type"))}
                      if scaling and scaling.get("rope_type", scaling.get("type")) in ("llama3", "linear") else None),
    )


class HFCheckpoint(Checkpoint):
    def __init__(self, path: Path):
        self.path = path
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise ExportError(f"{path} has no config.json: not a Hugging Face model folder")
        try:
            self.raw_config = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ExportError(f"unreadable {cfg_path}: {e}") from e
        self.config = _llama_from_hf_config(self.raw_config, path)
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ExportError(f"{path} has no *.safetensors weights")
        from safetensors import safe_open

        self._where: dict[str, object] = {}
        h = hashlib.sha256()
        for f in files:
            try:
                handle = safe_open(str(f), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise ExportError(f"unreadable weights file {f.name}: {e}") from e
            for name in handle.keys():
                self._where[name] = handle
            h.update(sha256_file(f).encode())
        self.source_hash = h.hexdigest()
        if not self.config.tie_word_embeddings and "lm_head.weight" not in self._where:
            self.config = _replace(self.config, tie_word_embeddings=True)

    def has(self, name: str) -> bool:
        return name in self._where

    def tensor(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise ExportError(f"tensor {name} missing from {self.path}")
        return self._where[name].get_tensor(name).float().numpy()

    def save_tokenizer(self, out: Path) -> None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(self.path))
        _save_fast_tokenizer(tok, out)


def _replace(cfg: LlamaConfig, **kw) -> LlamaConfig:
    from dataclasses import replace

    return replace(cfg, **kw)


def _save_fast_tokenizer(tok, out: Path) -> None:
    if not getattr(tok, "is_fast", False):
        raise ExportError("the source's tokenizer has no fast (tokenizer.json) form")
    tok.backend_tokenizer.save(str(out / "tokenizer.json"))
    info = {
        "chat_template": tok.chat_template if isinstance(tok.chat_template, str) else None,
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "add_bos_token": bool(getattr(tok, "add_bos_token", False)),
    }
    (out / "tokenizer_config.json").write_text(json.dumps(info, indent=1))


# GGUF names of the HF tensors (per layer, then global).
_GGUF_LAYER = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_GGUF_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}


def _gguf_name(hf_name: str) -> str:
    if hf_name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[hf_name]
    parts = hf_name.split(".")  # model.layers.{i}.rest
    if len(parts) > 3 and parts[1] == "layers":
        rest = ".".join(parts[3:])
        if rest in _GGUF_LAYER:
            return f"blk.{parts[2]}.{_GGUF_LAYER[rest]}"
    raise ExportError(f"no GGUF tensor for {hf_name}")


def _unpermute_rows(n_rows: int, n_head: int) -> np.ndarray:
    """llama.cpp stores q/k rows in rotary-interleaved order; this index brings them back to HF order."""
    idx = np.arange(n_rows)
    return idx.reshape(n_head, n_rows // n_head // 2, 2).swapaxes(1, 2).reshape(n_rows)


def _gguf_rope_scaling(field, where: str) -> dict | None:
    kind = field("llama.rope.scaling.type")
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(field("llama.rope.scaling.factor"))}
    raise ExportError(f"unsupported rope scaling {kind!r} in {where} (nomoat supports none, linear and llama3)")


class GGUFCheckpoint(Checkpoint):
    def __init__(self, path: Path):
        import gguf

        self.path = path
        try:
            self.reader = gguf.GGUFReader(str(path))
        except Exception as e:
            raise ExportError(f"unreadable GGUF file {path.name}: {e}") from e
        f = self.reader.fields

        def field(key, default=None):
            return f[key].contents() if key in f else default

        arch = field("general.architecture")
        if arch != "llama":
            raise ExportError(f"unsupported GGUF architecture {arch!r} in {path.name}: nomoat exports llama models")
        self.tensors = {t.name: t for t in self.reader.tensors}
        heads = int(field("llama.attention.head_count"))
        hidden = int(field("llama.embedding_length"))
        eos = field("tokenizer.ggml.eos_token_id")
        vocab = field("llama.vocab_size") or len(field("tokenizer.ggml.tokens", []))
        self.config = LlamaConfig(
            hidden_size=hidden,
            intermediate_size=int(field("llama.feed_forward_length")),
            num_layers=int(field("llama.block_count")),
            num_heads=heads,
            num_kv_heads=int(field("llama.attention.head_count_kv", heads)),
            head_dim=int(field("llama.attention.key_length", hidden // heads)),
            vocab_size=int(vocab),
            rope_theta=float(field("llama.rope.freq_base", 10000.0)),
            rms_norm_eps=float(field("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            max_position_embeddings=int(field("llama.context_length", 2048)),
            tie_word_embeddings="output.weight" not in self.tensors,
            bos_token_id=field("tokenizer.ggml.bos_token_id"),
            eos_token_ids=(int(eos),) if eos is not None else (),
            rope_scaling=_gguf_rope_scaling(field, path.name),
            rope_freq_factors=tuple(float(v) for v in np.asarray(self.tensors["rope_freqs.weight"].data, np.float32))
            if "rope_freqs.weight" in self.tensors else None,
        )
        # general.* names (name, basename, size label, license, …) for the manifest: which model this is
        self.general = {k.removeprefix("general."): v for k in f if k.startswith("general.")
                        and isinstance(v := field(k), str | int | float) and len(str(v)) <= 200}
        self.source_hash = sha256_file(path)
        # HF weight name -> GGUF type, for quantized tensors that no MatMulNBits layout holds exactly (the
        # export re-quantizes them and says so)
        self.requantized: dict[str, str] = {}

    def has(self, name: str) -> bool:
        try:
            return _gguf_name(name) in self.tensors
        except ExportError:
            return False

    def tensor(self, name: str) -> np.ndarray | QuantBlocks:
        import gguf
        from nomoat.edge.gguf_blocks import EXACT_TYPES, gguf_blocks

        t = self.tensors.get(_gguf_name(name))
        if t is None:
            raise ExportError(f"tensor {name} missing from {self.path.name}")
        kind = t.tensor_type.name
        n_rows = int(t.shape[-1]) if len(t.shape) > 1 else 1
        if kind in EXACT_TYPES:
            raw = np.asarray(t.data).reshape(n_rows, -1)
            b = gguf_blocks(kind, raw)
            out = QuantBlocks(b.bits, b.block_size, b.packed, b.scales, None, b.mins, f"gguf:{kind}", ((kind, raw),))
        else:
            if kind not in ("F32", "F16", "BF16", "F64"):
                self.requantized[name] = kind
            out = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            out = out.reshape(-1) if len(t.shape) == 1 else out.reshape(n_rows, -1)
        cfg = self.config
        if name.endswith("q_proj.weight") or name.endswith("k_proj.weight"):
            n_head = cfg.num_heads if "q_proj" in name else cfg.num_kv_heads
            rows = _unpermute_rows(n_rows, n_head)
            out = out.take_rows(rows) if isinstance(out, QuantBlocks) else out[rows]
        return out

    def save_tokenizer(self, out: Path) -> None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
        _save_fast_tokenizer(tok, out)
