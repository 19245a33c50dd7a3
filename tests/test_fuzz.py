"""A bounded, seeded fuzz campaign against one `nomoat serve` process on a real Mosquitto: malformed prompts
(every field, the id, the payload itself, Response Topics that must be refused, QoS 0/1/2), cancels and
adapter-topic junk. The daemon must stay connected, answer every answerable request exactly once, publish
only where it may, keep its memory, and answer a normal prompt the same way afterwards.

NOMOAT_FUZZ_N sets the number of messages (default 400, ~1 min; the campaign that found the defects was 1,200).
"""

from __future__ import annotations

import json
import os
import queue
import random
import re
import time

import pytest
from conftest import mosquitto_path
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from test_daemon import Broker, Client
from test_fleet_attacks import rss_mib, serve

pytestmark = [pytest.mark.mqtt, pytest.mark.slow,
              pytest.mark.skipif(not mosquitto_path(), reason="mosquitto is not installed")]

DEVICE = "dz"
HOSTILE_VALUES = [None, True, False, -1, 0, 1, 2**31, 2**64, 1e-300, -1e308, 1e308, 0.5, "", "x", "x" * 3000,
                  [], {}, [1, "a"], {"name": "a1"}, [{"name": "a1", "scale": 1e9}], [{"name": "nope"}],
                  [{"role": "user", "content": "hi"}], [{"role": 5}], "RAW:NaN", "RAW:1e999", "RAW:-Infinity",
                  'RAW:"a\\ud800b"', "RAW:" + "9" * 4400, "RAW:" + "[" * 1500 + "]" * 1500, "RAW:1.0e-400",
                  "\u202e\u0000\x7f😀", -0.0]
FIELDS = ["id", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "min_p",
          "repetition_penalty", "seed", "stop", "adapters", "stream", "deadline", "bogus"]
BAD_IDS = ["p2\n", "a/b", "#", "+", "", "x" * 200, "é", " id", "id\x00"]
REFUSED_TOPICS = ["x/y/#", "+", "#", f"nomoat/f/{DEVICE}/prompt", f"nomoat/f/{DEVICE}/cancel",
                  f"nomoat/f/{DEVICE}/status", f"nomoat/f/{DEVICE}/events", "nomoat/f/other/prompt", "nomoat/f/prompt",
                  "nomoat/f/adapters/a1", "$SYS/broker", "nomoat", "nomoat/f/other/reply/x"]


def encode(data: dict) -> bytes:
    """JSON, with "RAW:..." strings written as raw text (NaN, huge numbers, nesting, lone surrogates)."""
    raws = {}

    def walk(v):
        if isinstance(v, str) and v.startswith("RAW:"):
            key = f"@@raw{len(raws)}@@"
            raws[key] = v[4:]
            return key
        return v

    text = json.dumps({k: walk(v) for k, v in data.items()})
    for key, raw in raws.items():
        text = text.replace(json.dumps(key), raw)
    return text.encode("utf-8", "surrogatepass")


def hostile_request(rng: random.Random, i: int) -> tuple[bytes, bool]:
    """A payload, and whether it carries a valid id (so that the fallback reply topic can answer it)."""
    data: dict = {"id": f"z{i}", "prompt": rng.choice(["hi", "The capital", "東京 😀"]), "max_tokens": rng.randint(1, 3)}
    valid_id = True
    for _ in range(rng.choice([0, 1, 1, 2, 3])):
        field = rng.choice(FIELDS)
        if field == "id":
            data["id"] = rng.choice(BAD_IDS + [5, None, ["z"]])
            valid_id = False
        else:
            data[field] = rng.choice(HOSTILE_VALUES)
    payload = encode(data)
    whole = rng.random()
    if whole < 0.05:
        return bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300))), False
    if whole < 0.10:
        return payload[: rng.randint(0, len(payload))], False
    if whole < 0.13:
        return rng.choice([b"[]", b"null", b'"x"', b"7", b"[" * 3000, b"\xff\xfe"]), False
    if whole < 0.15:
        return payload[:-1] + b', "pad": "' + b"y" * 70000 + b'"}', valid_id  # too_large (profile: 64 KiB)
    return payload, valid_id


def hostile_cancel(rng: random.Random, i: int) -> bytes:
    return rng.choice([encode({"id": f"z{max(0, i - rng.randint(0, 5))}"}), b"garbage", b"[]", b'{"id": 5}',
                       b'{"id": []}', b"[" * 3000, b"", encode({"id": "RAW:" + "9" * 4400})])


def adapter_junk(rng: random.Random) -> tuple[str, bytes, bool]:
    name = rng.choice(["a1", "..", "state.json", "x" * 300, "junk", "Tone", ".partial"])
    if rng.random() < 0.5:
        payload = rng.choice([b"{}", b"junk", b'{"type": "adapter", "name": "a1", "version": 9}',
                              json.dumps({"type": "rollback", "name": name, "version": 1, "key": "00" * 32,
                                          "signature": "00" * 64, "created": 1e12}).encode(), b"[" * 3000])
        return f"nomoat/f/adapters/{name}", payload, False
    size = rng.choice([1, 100, 1024 * 1024])
    return f"nomoat/f/adapters/{name}/{rng.randint(0, 3)}/{rng.randint(0, 9)}", os.urandom(size), rng.random() < 0.3


def test_fuzz_the_daemon(tmp_path, slots, key):
    n = int(os.environ.get("NOMOAT_FUZZ_N", "400"))
    log = tmp_path / "mosquitto.log"
    broker = Broker(tmp_path, extra="log_dest stdout\nlog_type all\n", log=log)
    _, pub = key
    proc = serve(broker, slots, DEVICE, tmp_path / "store", pub, tmp_path)
    c = Client(broker)
    rng = random.Random(20261206)
    try:
        c.send(f"nomoat/f/{DEVICE}/prompt", {"id": "before", "prompt": "The capital", "max_tokens": 8})
        before_text = c.until_done("before")[-1][1]["text"]
        rss_before = rss_mib(proc.pid)
        must: dict[bytes, str] = {}  # correlation -> what it was, for requests that must get one final
        sent = set()
        finals: dict[bytes, list[dict]] = {}

        def drain(timeout: float) -> None:
            end = time.time() + timeout
            while time.time() < end:
                try:
                    _, m, corr = c.inbox.get(timeout=max(0.01, end - time.time()))
                except queue.Empty:
                    return
                if m.get("done"):
                    finals.setdefault(corr, []).append(m)
                if all(k in finals for k in must):
                    return

        for i in range(n):
            r = rng.random()
            qos = rng.choice([0, 1, 2])
            if r < 0.75:
                payload, valid_id = hostile_request(rng, i)
                props = Properties(PacketTypes.PUBLISH)
                corr = f"c{i}".encode()
                props.CorrelationData = corr
                where = rng.random()
                if where < 0.45:
                    props.ResponseTopic = c.reply_topic
                elif where < 0.8:
                    props.ResponseTopic = rng.choice(REFUSED_TOPICS)
                topic = rng.choice([f"nomoat/f/{DEVICE}/prompt"] * 4 + ["nomoat/f/prompt"])
                c.c.publish(topic, payload, qos=qos, properties=props).wait_for_publish(5)
                sent.add(corr)
                if where < 0.45 or valid_id:
                    must[corr] = payload[:200].decode("utf-8", "replace")
            elif r < 0.88:
                c.c.publish(f"nomoat/f/{DEVICE}/cancel", hostile_cancel(rng, i), qos=qos).wait_for_publish(5)
            else:
                topic, payload, retain = adapter_junk(rng)
                c.c.publish(topic, payload, qos=qos, retain=retain).wait_for_publish(5)
            if i % 20 == 19:  # bounded bursts: the broker's queue for the device never overflows
                drain(60)
        drain(60)
        time.sleep(1.0)
        drain(1)

        missing = {k: v for k, v in must.items() if k not in finals}
        assert not missing, f"{len(missing)} answerable requests got no final: {list(missing.items())[:5]}"
        twice = {k: v for k, v in finals.items() if len(v) > 1}
        assert not twice, f"answered more than once: {list(twice.items())[:3]}"
        assert set(finals) <= sent
        codes = [m["error"]["code"] for v in finals.values() for m in v if "error" in m]
        assert "internal" not in codes, [m for v in finals.values() for m in v if "error" in m and
                                         m["error"]["code"] == "internal"][:3]
        assert len(must) > n // 3 and codes.count("invalid_request") > 10

        c.send(f"nomoat/f/{DEVICE}/prompt", {"id": "after", "prompt": "The capital", "max_tokens": 8})
        assert c.until_done("after")[-1][1]["text"] == before_text
        grown = rss_mib(proc.pid) - rss_before
        assert grown < 48, f"RSS grew {grown:.1f} MiB"
        from collections import Counter

        print(f"\nfuzz: {n} messages, {len(sent)} prompts, {len(must)} answerable, {len(finals)} answered once, "
              f"error codes {dict(Counter(codes))}, RSS {rss_before:.0f} -> {rss_before + grown:.0f} MiB")
    finally:
        c.close()
        proc.terminate()
        proc.wait(timeout=30)
        broker.stop()

    text = log.read_text(errors="replace")
    client_id = f"nomoat-f-{DEVICE}"
    assert text.count(f"as {client_id} (") == 1, "the daemon reconnected"
    drops = re.findall(rf"Client {client_id} [^\n]*", text)  # its one clean disconnect at the end, no error
    assert len(drops) <= 1 and not any("error" in d or "timeout" in d for d in drops), drops
    allowed = (f"nomoat/f/{DEVICE}/status", f"nomoat/f/{DEVICE}/events", c.reply_topic)
    published = re.findall(rf"Received PUBLISH from {client_id} \(d\d, q\d, r\d, m\d+, '([^']*)'", text)
    assert published, "the broker log shows no publish from the daemon"
    stray = {t for t in published if t not in allowed and not t.startswith(f"nomoat/f/{DEVICE}/reply/")}
    assert not stray, f"published outside its topics: {stray}"
