"""Text in and out: the tokenizer (tokenizers' tokenizer.json), the chat template, streaming decode."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from .manifest import Manifest, ModelError


class Tokenizer:
    def __init__(self, folder: Path, manifest: Manifest):
        try:
            self.tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:
            raise ModelError(f"unreadable tokenizer.json in {folder}: {e}") from e
        cfg_file = folder / "tokenizer_config.json"
        self.cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
        self.bos_id = manifest.data.get("bos_token_id")
        self.add_bos = bool(manifest.data.get("add_bos_token"))
        self._template = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The model's own chat template, rendered as transformers does."""
        source = self.cfg.get("chat_template")
        if not source:
            raise ModelError("this model has no chat template")
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            self._template = env.from_string(source)
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.cfg.get("bos_token") or "",
                                     eos_token=self.cfg.get("eos_token") or "")


def _raise(message: str):
    raise ValueError(message)


class TextDecoder:
    """Turns tokens into text deltas whose concatenation is the final text.

    Text is released only when it is complete UTF-8 (a byte-fallback token may carry half a
    character) and cannot be the start of a stop string; a stop string ends the text before it.
    """

    def __init__(self, tokenizer: Tokenizer, stop: list[str] | tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.full = ""  # decoded text so far (not yet cut at a stop string)
        self.text = ""  # released text
        self.stopped = False
        self._start = self._done = 0  # ids[_start:_done] decoded last time, ids[_done:] not yet in `full`

    def _tail(self) -> str:
        """The text ids[_done:] add: the difference of two decodes from the same token, as vLLM and TGI detokenize
        (a word-start space comes out as in a whole decode), at a cost that does not grow with the text."""
        before = self.tokenizer.decode(self.ids[self._start:self._done])
        after = self.tokenizer.decode(self.ids[self._start:])
        return after[len(before):] if len(after) > len(before) else ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        tail = self._tail()
        if not tail or tail.endswith("\ufffd"):
            return ""  # nothing yet, or an incomplete multi-byte character: wait for the next token
        self.full += tail
        self._start, self._done = self._done, len(self.ids)
        for s in self.stop:
            cut = self.full.find(s, max(0, len(self.text) - len(s)))
            if cut >= 0:
                self.stopped = True
                return self._release(self.full[:cut])
        return self._release(self.full[: len(self.full) - self.hold] if self.stop else self.full)

    def flush(self) -> str:
        if self.stopped:
            return ""
        # whatever was held back, less a character that the last token left incomplete (max_tokens or a cancel
        # can cut one): its bytes are dropped, never sent as U+FFFD
        self.full += self._tail().rstrip("\ufffd")
        self._start = self._done = len(self.ids)
        return self._release(self.full)

    def _release(self, upto: str) -> str:
        if not upto.startswith(self.text) or len(upto) <= len(self.text):
            return ""
        delta = upto[len(self.text):]
        self.text = upto
        return delta
