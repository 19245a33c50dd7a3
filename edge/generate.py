"""The generation loop: prefill, decode_one_token, and a streaming `generate` around them.

Everything per step is bound once through IOBinding: the KV buffers (past == present, shared),
the LoRA slot tensors of the active adapters, the logits buffer. A decode step looks up its token's
embedding (edge/embedding.py), updates three small inputs in place and runs the session; nothing else
is copied.

The cache outlives a call: a prompt that starts like the tokens it holds (a chat's history, a shared
system prompt) is fed from the first token that differs (`prompt_logits`, profile.prompt_cache).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .adapters import AdapterSet, read_adapter
from .embedding import TokenEmbedding
from .model import Model, trim_heap
from .profile import Profile
from .sampling import SamplingParams, choose
from .speculate import Drafts, ModelDrafter
from .text import TextDecoder, Tokenizer


class GenerationError(ValueError):
    """A request that cannot be served (too long, bad parameters, unknown adapter); `code` is the protocol's
    error code for it."""

    def __init__(self, message: str, code: str = "invalid_request"):
        super().__init__(message)
        self.code = code


@dataclass
class Result:
    text: str
    tokens: list[int]
    finish_reason: str  # stop | length | cancelled
    prompt_tokens: int
    timings: dict = field(default_factory=dict)

    @property
    def usage(self) -> dict:
        n = len(self.tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}


class Generator:
    def __init__(self, folder: str | Path, profile: Profile | None = None, verify_files: bool = True,
                 shared_threads: bool = False):
        # a model and its draft model take turns on one thread pool (edge/model.py: _shared_pool)
        shared_threads = shared_threads or bool(profile and profile.draft_model)
        self.model = Model(folder, profile, verify_files=verify_files, shared_threads=shared_threads)
        self.manifest = self.model.manifest
        self.tokenizer = Tokenizer(self.model.folder, self.manifest)
        self.adapters = AdapterSet(self.manifest)
        self.vocab = self.manifest.config["vocab_size"]
        self.embedding = None  # format 1 graphs (and optimum's) take token ids and look them up themselves
        if self.manifest.embedding:
            self.embedding = TokenEmbedding(self.model.folder, self.manifest.embedding, self.vocab,
                                            self.manifest.config["hidden_size"])
        self._input_name = "inputs_embeds" if self.embedding else "input_ids"
        self._one_token = ort.OrtValue.ortvalue_from_numpy(self._inputs([0]))
        self._past: dict[str, np.ndarray] = {}  # optimum's graphs only
        self._binding = self.model.session.io_binding()
        self._prefill_binding: ort.IOBinding | None = None
        self._bindings = [self._binding]
        self._cached: list[int] = []  # the tokens whose keys and values the cache holds, position by position
        self._bound: tuple = ((), 0)  # (adapter selection, AdapterSet.changes) the cache was computed with
        self._prompt_logits: tuple[int, np.ndarray] | None = None  # (length, logits) of the last prompt fed
        self.can_speculate = False
        self.drafter: ModelDrafter | None = None  # a draft model (profile.draft_model); None: prompt lookup
        if not self.manifest.shared_kv:
            return
        self._logits = ort.OrtValue.ortvalue_from_shape_and_type([1, 1, self.vocab], np.float32, "cpu", 0)
        self._seqlens = ort.OrtValue.ortvalue_from_numpy(np.zeros(1, np.int32))
        self._total = ort.OrtValue.ortvalue_from_numpy(np.array(0, np.int32))
        # the prefill session (profile.prefill_accuracy_level) writes the same KV buffers
        if self.model.prefill_session:
            self._prefill_binding = self.model.prefill_session.io_binding()
            self._bindings.append(self._prefill_binding)
        # graphs that return the logits of their last `logits_count` positions can check drafts (edge/speculate.py)
        self.can_speculate = "logits_count" in {i.name for i in self.model.session.get_inputs()}
        self._logits_count = ort.OrtValue.ortvalue_from_numpy(np.ones(1, np.int64))
        self._logit_rows = {1: self._logits}  # logits buffers by row count
        self._rows = 1
        for binding in self._bindings:
            if self.can_speculate:
                binding.bind_ortvalue_input("logits_count", self._logits_count)
            for buf, (past, present) in zip(self.model.kv, self.model.kv_names, strict=True):
                binding.bind_ortvalue_input(past, buf)
                binding.bind_ortvalue_output(present, buf)
            binding.bind_ortvalue_output("logits", self._logits)
            binding.bind_ortvalue_input("seqlens_k", self._seqlens)
            binding.bind_ortvalue_input("total_sequence_length", self._total)
        self.select_adapters(())
        if self.model.profile.draft_model:
            self._attach_draft(self.model.profile.draft_model)
        trim_heap()

    def _attach_draft(self, folder: str | Path) -> None:
        """Make drafts with this smaller exported model (the same tokenizer) instead of prompt lookup. It runs with
        this profile's threads and context, without adapters and without a draft of its own."""
        if not self.can_speculate:
            raise GenerationError(f"{self.manifest.name} cannot check drafts (exported before its graph took "
                                  "logits_count, or by optimum): re-export it to use a draft model")
        profile = replace(self.model.profile, draft_model="", draft_tokens=0, prompt_cache=True,
                          prefill_accuracy_level=None)
        draft = Generator(folder, profile, shared_threads=True)
        if not draft.manifest.shared_kv:
            raise GenerationError(f"the draft model {folder} is an optimum graph: export it with nomoat's builder")
        if draft.tokenizer.tok.get_vocab() != self.tokenizer.tok.get_vocab():
            raise GenerationError(f"the draft model {draft.manifest.name} has another tokenizer than "
                                  f"{self.manifest.name}: its tokens would mean other text")
        self.drafter = ModelDrafter(draft, set(self.manifest.eos_token_ids), self.vocab)

    # ---- adapters --------------------------------------------------------------------------
    def load_adapter(self, path: str | Path, name: str | None = None) -> str:
        adapter = read_adapter(path, self.manifest, name)
        self.adapters.add(adapter)
        return adapter.name

    def select_adapters(self, selection: tuple[tuple[str, float], ...]) -> None:
        """Bind the stacked slot tensors of these adapters (a pointer swap once cached)."""
        if not self.manifest.lora["rank"]:
            if selection:
                raise GenerationError(f"{self.manifest.name} has no LoRA slots; it cannot apply adapters")
            return
        # read before binding: an adapter installed meanwhile then costs a re-prefill, never a stale cache
        bound = (tuple(selection), self.adapters.changes)
        try:
            for name, value in self.adapters.inputs(tuple(selection)).items():
                for binding in self._bindings:
                    binding.bind_ortvalue_input(name, value)
        except Exception as e:
            raise GenerationError(str(e), "unknown_adapter") from e
        if bound != self._bound:  # other adapters: the cached keys and values are no longer this model's
            self._bound, self._cached, self._prompt_logits = bound, [], None

    # ---- the model calls -------------------------------------------------------------------
    def _inputs(self, tokens: list[int]) -> np.ndarray:
        """The graph's input for these tokens: their embeddings [1, S, hidden], or ids [1, S] (format 1)."""
        if self.embedding:
            return self.embedding(tokens)[None]
        return np.array([tokens], np.int64)

    def _forward(self, tokens: list[int], total: int, prefill: bool = False, rows: int = 1) -> np.ndarray:
        """Feed tokens as positions [total - len(tokens), total); the logits after the last one [vocab], or after
        each of the last `rows` ones [rows, vocab] (rows > 1: graphs with logits_count only)."""
        if not self.manifest.shared_kv:
            return self._forward_concat(np.array([tokens], np.int64), total)
        if rows != self._rows:
            if rows not in self._logit_rows:
                self._logit_rows[rows] = ort.OrtValue.ortvalue_from_shape_and_type([1, rows, self.vocab], np.float32,
                                                                                   "cpu", 0)
            for binding in self._bindings:
                binding.bind_ortvalue_output("logits", self._logit_rows[rows])
            self._logits_count.update_inplace(np.array([rows], np.int64))
            self._rows = rows
        if len(tokens) == 1:
            self._one_token.update_inplace(self._inputs(tokens))
            inputs = self._one_token
        else:
            inputs = ort.OrtValue.ortvalue_from_numpy(self._inputs(tokens))
        self._seqlens.update_inplace(np.array([total - 1], np.int32))
        self._total.update_inplace(np.array(total, np.int32))
        session, binding = self.model.session, self._binding
        if prefill and self._prefill_binding:
            session, binding = self.model.prefill_session, self._prefill_binding
        binding.bind_ortvalue_input(self._input_name, inputs)
        start = total - len(tokens)
        del self._cached[start:]  # before the run: a run that fails leaves these positions unknown
        if self._prompt_logits and start < self._prompt_logits[0]:
            self._prompt_logits = None
        session.run_with_iobinding(binding)
        if start == len(self._cached):  # (a write past the known tokens claims nothing)
            self._cached += tokens
        out = self._logit_rows[rows].numpy()[0]
        return out[0] if rows == 1 else out

    def _forward_concat(self, ids: np.ndarray, total: int) -> np.ndarray:
        """optimum's graphs (`export --via optimum`): attention mask and positions as inputs, the cache
        returned as past + new, logits for every position. A plain loop, kept for cross-checking."""
        new = ids.shape[1]
        if total == new:  # a new sequence
            _, heads, _, dim = self.manifest.kv_shape
            empty = np.zeros((1, heads, 0, dim), np.float32)
            self._past = {f"past_key_values.{i}.{part}": empty
                          for i in range(self.manifest.num_layers) for part in ("key", "value")}
        feeds = {"input_ids": ids, "attention_mask": np.ones((1, total), np.int64),
                 "position_ids": np.arange(total - new, total, dtype=np.int64)[None], **self._past}
        names = [o.name for o in self.model.session.get_outputs()]
        outputs = dict(zip(names, self.model.session.run(names, feeds), strict=True))
        self._past = {n.replace("present", "past_key_values"): v for n, v in outputs.items() if n.startswith("present")}
        return outputs["logits"][0, -1]

    def prefill(self, tokens: list[int], start: int = 0) -> np.ndarray:
        """Logits after the prompt, feeding tokens[start:] on top of a cache that holds tokens[:start].
        Long prompts go in chunks (profile.prefill_chunk): the same logits, but the attention and MLP buffers
        of the largest run, which onnxruntime's arena keeps, stay small."""
        if not tokens:
            raise GenerationError("empty prompt")
        if not 0 <= start < len(tokens):
            raise GenerationError(f"prefill from position {start} of a {len(tokens)}-token prompt")
        step = self.model.profile.prefill_chunk or len(tokens)
        long = len(tokens) - start >= self.model.profile.prefill_min_tokens  # the prefill session, if any
        for pos in range(start, len(tokens), step):
            chunk = tokens[pos:pos + step]
            logits = self._forward(chunk, pos + len(chunk), prefill=long)
        return logits

    def cached_prefix(self, tokens: list[int]) -> int:
        """How many leading tokens of `tokens` the cache already holds (0 with profile.prompt_cache off)."""
        if not self.model.profile.prompt_cache:
            return 0
        n = 0
        for held, token in zip(self._cached, tokens, strict=False):  # (the shorter one decides)
            if held != token:
                break
            n += 1
        return n

    def prompt_logits(self, tokens: list[int]) -> tuple[np.ndarray, int]:
        """Logits after the prompt and how many of its tokens were already in the cache, not fed again.

        At least the last token is fed, unless the whole prompt is the last one fed, whose logits are kept:
        the same prompt twice gives the same logits bit for bit. Cached prompt tokens change nothing measurable
        (SmolLM2, a prompt split in two: bit-identical logits); cached generated tokens were fed one at a time,
        whose int8 activation rounding differs from a prompt pass's (SmolLM2: logits within ~1, the path
        `nomoat export` verifies), so a follow-up's answer can differ from a cold run's, as with llama.cpp's."""
        reused = self.cached_prefix(tokens)
        last = self._prompt_logits
        if reused == len(tokens) and last and last[0] == len(tokens):
            return last[1].copy(), reused
        reused = min(reused, len(tokens) - 1)
        logits = self.prefill(tokens, reused)
        self._prompt_logits = (len(tokens), logits.copy())
        return logits, reused

    def decode_one_token(self, token: int, position: int) -> np.ndarray:
        """Logits after feeding `token` at `position` (0-based) on top of the cache."""
        return self._forward([token], position + 1)

    # ---- the loop --------------------------------------------------------------------------
    def check_prompt(self, tokens: list[int], max_tokens: int) -> int:
        if not tokens:
            raise GenerationError("empty prompt")
        room = self.model.max_length - len(tokens)
        if room < 1:
            raise GenerationError(f"prompt is {len(tokens)} tokens; the context limit is {self.model.max_length}",
                                  "context_length")
        return min(max_tokens, room)

    def stream(self, prompt: str | list[int] | list[dict], max_tokens: int = 128,
               params: SamplingParams | None = None, stop: list[str] | tuple[str, ...] = (),
               adapters: tuple[tuple[str, float], ...] = (),
               cancelled: Callable[[], bool] = lambda: False,
               draft_tokens: int | None = None) -> Iterator[str | Result]:
        """Yield text deltas, then one Result whose text is exactly their concatenation.

        draft_tokens: speculative decoding, at most this many drafted tokens per pass (0: off; None: the profile's),
        drafted by the draft model if one is attached, else by prompt lookup. Greedy answers are the same tokens
        either way (up to the kernels' rounding, which can differ between a one-token and a several-token pass);
        sampled ones keep the model's distribution."""
        params = params or SamplingParams()
        try:
            params.validate()
        except ValueError as e:
            raise GenerationError(str(e)) from e
        if max_tokens < 1:
            raise GenerationError("max_tokens must be >= 1")
        tokens = self.encode(prompt)
        budget = self.check_prompt(tokens, max_tokens)
        self.select_adapters(tuple(adapters))
        rng = np.random.default_rng(params.seed)
        seen = np.array(tokens, np.int64)
        eos = set(self.manifest.eos_token_ids)
        decoder = TextDecoder(self.tokenizer, stop)

        t0 = time.perf_counter()
        logits, cached = self.prompt_logits(tokens)
        most = self.draft_limit(draft_tokens)
        if most and self.drafter:
            self.drafter.prime(tokens)
        t1 = time.perf_counter()
        drafts = Drafts(most, self.drafter) if most else None
        history = list(tokens)  # what the drafts are looked up in: the prompt and the answer so far
        out: list[int] = []
        chosen = passes = drafted = accepted = 0
        finish = "length"
        rows, draft = logits[None], []  # the logits to choose from, one row per drafted token + 1
        done = False
        while not done:
            took = 0
            for i, row in enumerate(rows):
                token, ok = choose(row, params, rng, seen if params.repetition_penalty != 1.0 else None,
                                   draft[i] if i < len(draft) else None)
                chosen += 1
                took += ok
                if token in eos:
                    finish, done = "stop", True
                    break
                out.append(token)
                history.append(token)
                if params.repetition_penalty != 1.0:
                    seen = np.append(seen, token)
                delta = decoder.add(token)
                if delta:
                    yield delta
                if decoder.stopped:
                    finish, done = "stop", True
                elif len(out) >= budget:
                    done = True
                elif cancelled():
                    finish, done = "cancelled", True
                if done or not ok:
                    break
            accepted += took
            if done:
                break
            if drafts:
                drafts.update(len(draft), took)
            position = len(tokens) + len(out) - 1  # where `token` goes
            room = min(budget - len(out), self.model.max_length - position) - 1  # tokens a pass may add
            draft = drafts.next(history, room) if drafts and room > 0 else []
            began = time.perf_counter()
            if draft:
                rows = self._forward([token, *draft], position + 1 + len(draft), rows=len(draft) + 1)
                drafted += len(draft)
            else:
                rows = self.decode_one_token(token, position)[None]
            if drafts:
                drafts.timed(len(rows), time.perf_counter() - began)
            passes += 1
        t2 = time.perf_counter()
        tail = decoder.flush()
        if tail:
            yield tail
        fed = len(tokens) - cached
        steps = chosen - 1  # tokens chosen after the first, which the prompt's logits gave
        timings = {
            "prefill_s": round(t1 - t0, 4), "decode_s": round(t2 - t1, 4), "cached_tokens": cached,
            "prefill_tok_s": round(fed / (t1 - t0), 1) if fed else 0.0,  # of the tokens fed
            "decode_tok_s": round(steps / (t2 - t1), 1) if steps else 0.0,
        }
        if drafts:
            timings.update({"passes": passes, "drafted": drafted, "accepted": accepted})
        yield Result(decoder.text, out, finish, len(tokens), timings)

    def draft_limit(self, draft_tokens: int | None) -> int:
        """Most tokens a pass may draft: the request's, else the profile's; 0 where the graph cannot check drafts
        (exported before logits_count, or optimum's)."""
        most = self.model.profile.draft_tokens if draft_tokens is None else draft_tokens
        return max(0, most) if self.can_speculate else 0

    def generate(self, prompt, **kw) -> Result:
        *_, result = self.stream(prompt, **kw)
        return result

    def encode(self, prompt: str | list[int] | list[dict]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if prompt and all(isinstance(m, dict) for m in prompt):
            try:
                text = self.tokenizer.chat(prompt)
            except Exception as e:  # the model's template may refuse roles or orders (raise_exception)
                raise GenerationError(f"the chat template refused these messages: {e}") from e
            return self.tokenizer.encode(text, add_special_tokens=False)
        if all(isinstance(t, int) and 0 <= t < self.vocab for t in prompt):
            return list(prompt)
        raise GenerationError("prompt must be text, a list of chat messages or a list of token ids")
