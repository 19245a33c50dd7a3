"""The MQTT protocol (docs/protocol.md): topics, request validation, reply messages. No I/O here."""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

from .sampling import SamplingParams

PROTOCOL_VERSION = 1
_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")  # ids appear in topic names: no '/', '+', '#' (fullmatch: no "\n")
_FIELDS = {"id", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "min_p",
           "repetition_penalty", "seed", "stop", "adapters", "stream", "deadline"}


ROLES = ("system", "user", "assistant", "tool")  # what chat templates know


class RequestError(Exception):
    def __init__(self, code: str, message: str, request_id: str | None = None):
        super().__init__(message)
        self.code, self.message, self.request_id = code, message, request_id


@dataclass
class Topics:
    prefix: str
    fleet: str
    device: str

    @property
    def prompt(self) -> str:
        return f"{self.prefix}/{self.fleet}/{self.device}/prompt"

    @property
    def pool(self) -> str:
        return f"{self.prefix}/{self.fleet}/prompt"

    @property
    def pool_shared(self) -> str:  # MQTT 5 shared subscription: the broker gives each prompt to one device
        return f"$share/{self.fleet}/{self.pool}"

    @property
    def cancel(self) -> str:
        return f"{self.prefix}/{self.fleet}/{self.device}/cancel"

    @property
    def status(self) -> str:
        return f"{self.prefix}/{self.fleet}/{self.device}/status"

    @property
    def availability(self) -> str:  # retained "online" / "offline" (the pool connection's Last Will)
        return f"{self.prefix}/{self.fleet}/{self.device}/availability"

    @property
    def events(self) -> str:
        return f"{self.prefix}/{self.fleet}/{self.device}/events"

    @property
    def adapters(self) -> str:
        return f"{self.prefix}/{self.fleet}/adapters"

    def adapter(self, name: str) -> str:  # an adapter's signed manifest; its chunks are under it
        return f"{self.adapters}/{name}"

    def reply(self, request_id: str) -> str:
        return f"{self.prefix}/{self.fleet}/{self.device}/reply/{request_id}"


@dataclass
class Request:
    id: str
    prompt: str | list[dict]
    max_tokens: int = 128
    params: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    adapters: tuple[tuple[str, float], ...] = ()
    stream: bool = True
    deadline: float | None = None
    received: float = field(default_factory=time.time)
    content: str = ""  # what the request asks, for telling a repeat of this id from another request under it


def _typed(data: dict, key: str, kinds, rid, default=None):
    value = data.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise RequestError("invalid_request", f"{key} has the wrong type", rid)
    if not isinstance(value, kinds):
        raise RequestError("invalid_request", f"{key} has the wrong type", rid)
    if isinstance(value, float) and not math.isfinite(value):  # 1e999 parses as inf
        raise RequestError("invalid_request", f"{key} must be a finite number", rid)
    return value


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")  # Python's json would take NaN and Infinity


def _text(value: str) -> bool:
    """A string that is Unicode text: JSON's \\ud800 escapes can make lone surrogates, which no tokenizer takes."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_request(payload: bytes, max_payload: int, max_prompt_chars: int, max_new_tokens: int) -> Request:
    """A validated request, or RequestError with a code (and the id when one could be read)."""
    if len(payload) > max_payload:
        raise RequestError("too_large", f"payload is {len(payload)} bytes; the limit is {max_payload}",
                           sniff_id(payload))
    try:
        data = json.loads(payload, parse_constant=_no_constant)
    except RecursionError:
        raise RequestError("invalid_json", "payload is nested too deeply", sniff_id(payload)) from None
    except ValueError as e:  # bad UTF-8, bad JSON, NaN, integers of 4300+ digits
        raise RequestError("invalid_json", f"payload is not JSON: {str(e)[:200]}", sniff_id(payload)) from None
    if not isinstance(data, dict):
        raise RequestError("invalid_request", "payload must be a JSON object")
    rid = data.get("id")
    if not isinstance(rid, str) or not _ID.fullmatch(rid):
        raise RequestError("invalid_request", "id is required: 1-128 characters of [A-Za-z0-9_.:-]")
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise RequestError("invalid_request", f"unknown fields: {', '.join(unknown)}", rid)
    prompt, messages = data.get("prompt"), data.get("messages")
    if (prompt is None) == (messages is None):
        raise RequestError("invalid_request", "give exactly one of prompt or messages", rid)
    if prompt is not None:
        if not isinstance(prompt, str) or not prompt or not _text(prompt):
            raise RequestError("invalid_request", "prompt must be a non-empty string of Unicode text", rid)
        size = len(prompt)
    else:
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
                and _text(m["content"]) and not set(m) - {"role", "content"} for m in messages):
            raise RequestError("invalid_request", "messages must be a list of {role, content} with role one of "
                               f"{', '.join(ROLES)} and content a string", rid)
        prompt = [{"role": m["role"], "content": m["content"]} for m in messages]
        size = sum(len(m["content"]) for m in prompt)
    if size > max_prompt_chars:
        raise RequestError("too_large", f"prompt is {size} characters; the limit is {max_prompt_chars}", rid)
    max_tokens = _typed(data, "max_tokens", int, rid, min(128, max_new_tokens))
    if not 1 <= max_tokens <= max_new_tokens:
        raise RequestError("invalid_request", f"max_tokens must be within 1..{max_new_tokens}", rid)
    params = SamplingParams(
        temperature=float(_typed(data, "temperature", (int, float), rid, 0.0)),
        top_p=float(_typed(data, "top_p", (int, float), rid, 1.0)),
        top_k=_typed(data, "top_k", int, rid, 0),
        min_p=float(_typed(data, "min_p", (int, float), rid, 0.0)),
        repetition_penalty=float(_typed(data, "repetition_penalty", (int, float), rid, 1.0)),
        seed=_typed(data, "seed", int, rid, None),
    )
    if params.seed is not None and not 0 <= params.seed < 2**64:
        raise RequestError("invalid_request", "seed must be within 0 ... 2^64-1", rid)
    try:
        params.validate()
    except ValueError as e:
        raise RequestError("invalid_request", str(e), rid) from None
    stop = _typed(data, "stop", (list, str), rid, [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > 8 or not all(isinstance(s, str) and 0 < len(s) <= 256 and _text(s) for s in stop):
        raise RequestError("invalid_request", "stop must be a string or a list of at most 8 strings of 1-256 "
                           "characters", rid)
    adapters = []
    requested = _typed(data, "adapters", list, rid, [])
    if len(requested) > 8:
        raise RequestError("invalid_request", "at most 8 adapters", rid)
    for a in requested:
        if not isinstance(a, dict) or not isinstance(a.get("name"), str) or \
                not isinstance(a.get("scale", 1.0), (int, float)) or isinstance(a.get("scale"), bool) or \
                not math.isfinite(a.get("scale", 1.0)) or abs(a.get("scale", 1.0)) > 100 or set(a) - {"name", "scale"}:
            raise RequestError("invalid_request", "adapters must be a list of {name, scale} (scale within "
                               "[-100, 100])", rid)
        adapters.append((a["name"], float(a.get("scale", 1.0))))
    deadline = _typed(data, "deadline", (int, float), rid, None)
    content = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
    return Request(rid, prompt, max_tokens, params, stop, tuple(adapters),
                   bool(_typed(data, "stream", bool, rid, True)), deadline, content=content)


def sniff_id(payload: bytes) -> str | None:
    """The id of a payload that could not be parsed, where its first 4 KiB show one (so it can be answered)."""
    m = re.search(rb'"id"\s*:\s*"([A-Za-z0-9_.:\-]{1,128})"', payload[:4096])
    return m.group(1).decode() if m else None


def check_response_topic(topic: str, topics: Topics) -> str | None:
    """Why a request's MQTT 5 Response Topic is refused, or None. A reply must not land on a topic that devices
    or operators act on: inside nomoat's namespace only the fleet's client inboxes and this device's own reply
    topics are allowed (the broker's ACL is the second line: tools/mosquitto/nomoat.acl)."""
    if not topic or len(topic.encode("utf-8", "replace")) > 1024:
        return "it must be 1-1024 bytes"
    if any(c in topic for c in "+#\0"):
        return "it must not contain wildcards or NUL"
    if topic.startswith("$"):
        return "it must not be a $ topic"
    if topic == topics.prefix or topic.startswith(f"{topics.prefix}/"):
        allowed = (f"{topics.prefix}/{topics.fleet}/clients/", f"{topics.prefix}/{topics.fleet}/{topics.device}/reply/")
        if not topic.startswith(allowed):
            return f"inside {topics.prefix}/ only {allowed[0]}… and {allowed[1]}… are allowed"
    return None


def chunk(rid: str, seq: int, delta: str) -> bytes:
    return json.dumps({"id": rid, "seq": seq, "delta": delta}).encode()


def final(rid: str, text: str, finish_reason: str, usage: dict, timings: dict) -> bytes:
    return json.dumps({"id": rid, "done": True, "text": text, "finish_reason": finish_reason,
                       "usage": usage, "timings": timings}).encode()


def repeated(final_message: bytes) -> bytes:
    """A final message sent again for a repeat of its request, marked so."""
    return json.dumps({**json.loads(final_message), "repeat": True}).encode()


def error(rid: str | None, code: str, message: str) -> bytes:
    return json.dumps({"id": rid, "done": True, "error": {"code": code, "message": message}}).encode()


@dataclass
class Broker:
    host: str
    port: int
    tls: bool


def parse_broker(url: str) -> Broker:
    """mqtt://host[:port] or mqtts://host[:port] (TLS, default port 8883)."""
    u = urlparse(url if "://" in url else f"mqtt://{url}")
    if u.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ValueError(f"broker URL must start with mqtt:// or mqtts://, got {url!r}")
    tls = u.scheme in ("mqtts", "ssl")
    return Broker(u.hostname or "127.0.0.1", u.port or (8883 if tls else 1883), tls)
