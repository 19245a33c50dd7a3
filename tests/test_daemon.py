"""nomoat serve against a real Mosquitto broker and real paho clients, with the tiny model."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import paho.mqtt.client as mqtt
import pytest
from conftest import mosquitto_path
from nomoat.edge.daemon import Daemon
from nomoat.edge.generate import Generator
from nomoat.edge.profile import Profile
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

pytestmark = [pytest.mark.mqtt, pytest.mark.skipif(not mosquitto_path(), reason="mosquitto is not installed")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    def __init__(self, tmp_path, extra: str = "", log=None):
        self.port, self.log = free_port(), log  # log: a file for mosquitto's stdout (with `log_dest stdout`)
        self.conf = tmp_path / f"mosquitto-{self.port}.conf"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n{extra}")
        self.proc = None
        self.start()

    def start(self):
        out = open(self.log, "a") if self.log else subprocess.DEVNULL  # noqa: SIM115 (the broker's, until it stops)
        self.proc = subprocess.Popen([mosquitto_path(), "-c", str(self.conf)], stdout=out, stderr=subprocess.STDOUT)
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def stop(self):
        self.proc.kill()
        self.proc.wait()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"


class Client:
    """A test client: publishes requests (with or without Response Topic) and collects every reply."""

    def __init__(self, broker: Broker):
        self.inbox: queue.Queue = queue.Queue()
        self.reply_topic = f"test/replies/{uuid.uuid4().hex}"
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.c.on_message = lambda c, u, m: self.inbox.put((m.topic, json.loads(m.payload),
                                                            getattr(m.properties, "CorrelationData", None)))
        self.c.connect("127.0.0.1", broker.port)
        self.c.loop_start()
        self.subscribe(self.reply_topic)
        self.subscribe("nomoat/f/+/reply/#")

    def subscribe(self, topic):
        done = queue.Queue()
        self.c.on_subscribe = lambda *a: done.put(1)
        self.c.subscribe(topic, qos=1)
        done.get(timeout=5)

    def send(self, topic, payload, correlation: bytes | None = b"corr", response=True):
        props = Properties(PacketTypes.PUBLISH)
        if response:
            props.ResponseTopic = self.reply_topic
        if correlation is not None:
            props.CorrelationData = correlation
        data = payload if isinstance(payload, (bytes, str)) else json.dumps(payload)
        self.c.publish(topic, data, qos=1, properties=props).wait_for_publish(5)

    def until_done(self, rid=None, timeout=30.0):
        """All messages up to the final one of request `rid`."""
        got, end = [], time.time() + timeout
        while time.time() < end:
            try:
                item = self.inbox.get(timeout=max(0.01, end - time.time()))
            except queue.Empty:
                break
            got.append(item)
            if item[1].get("done") and (rid is None or item[1].get("id") == rid):
                return got
        raise AssertionError(f"no final message for {rid}; got {got}")

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


def profile(broker, device="d1", **kw) -> Profile:
    p = Profile(queue_size=kw.pop("queue_size", 4), max_payload_bytes=kw.pop("max_payload_bytes", 8192),
                max_prompt_chars=kw.pop("max_prompt_chars", 500), max_new_tokens=64, **kw)
    p.mqtt.broker, p.mqtt.fleet, p.mqtt.device, p.mqtt.session_expiry = broker.url, "f", device, 600
    return p


@pytest.fixture
def model(exported):
    return exported("slots", lora_rank=8, precision="fp32")


@pytest.fixture
def daemon(broker, model):
    d = Daemon(Generator(model), profile(broker))
    d.start()
    wait_status(broker, "d1", "online")
    yield d
    d.stop()


def test_status_describes_the_model(broker, daemon):
    status = wait_status(broker, "d1", "online")
    assert status["model_hash"] == daemon.gen.manifest.model_hash
    assert status["context_length"] == daemon.gen.model.max_length and status["kv_cache"] == "float32"
    assert status["limits"] == {"max_new_tokens": 64, "max_prompt_chars": 500, "max_payload_bytes": 8192,
                                "queue_size": 4, "max_packet_bytes": 1024 * 1024 + 64 * 1024}


def wait_status(broker, device, state, timeout=15.0) -> dict:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    box: queue.Queue = queue.Queue()
    c.on_message = lambda cl, u, m: box.put(json.loads(m.payload)) if m.payload else None
    c.connect("127.0.0.1", broker.port)
    c.subscribe(f"nomoat/f/{device}/status", qos=1)
    c.loop_start()
    end = time.time() + timeout
    try:
        while time.time() < end:
            try:
                s = box.get(timeout=0.5)
            except queue.Empty:
                continue
            if s["state"] == state:
                return s
        raise AssertionError(f"{device} never reported {state}")
    finally:
        c.disconnect()
        c.loop_stop()


def test_request_reply_with_response_topic_and_correlation(broker, daemon):
    c = Client(broker)
    c.send("nomoat/f/d1/prompt", {"id": "r1", "prompt": "The capital", "max_tokens": 12}, correlation=b"xyz")
    msgs = c.until_done("r1")
    assert all(topic == c.reply_topic and corr == b"xyz" for topic, _, corr in msgs)
    chunks = [m for _, m, _ in msgs if "delta" in m]
    final = msgs[-1][1]
    assert [m["seq"] for m in chunks] == list(range(len(chunks)))
    assert "".join(m["delta"] for m in chunks) == final["text"]
    assert final["usage"]["completion_tokens"] <= 12 and final["finish_reason"] in ("stop", "length")
    assert final["text"] == Generator(daemon.gen.model.folder).generate("The capital", max_tokens=12).text
    assert {"passes", "drafted", "accepted"} <= final["timings"].keys()  # speculative decoding, on by default
    # the same prompt again: the device's cache holds it, and the answer is the same
    c.send("nomoat/f/d1/prompt", {"id": "r1b", "prompt": "The capital", "max_tokens": 12})
    again = c.until_done("r1b")[-1][1]
    assert again["timings"]["cached_tokens"] == final["usage"]["prompt_tokens"] and again["text"] == final["text"]
    c.close()


def test_fallback_reply_topic_and_no_stream(broker, daemon):
    c = Client(broker)
    c.send("nomoat/f/d1/prompt", {"id": "r2", "prompt": "hello", "max_tokens": 5, "stream": False},
           response=False, correlation=None)
    msgs = c.until_done("r2")
    assert [t for t, _, _ in msgs] == ["nomoat/f/d1/reply/r2"]
    assert msgs[0][1]["done"] is True
    c.close()


@pytest.mark.parametrize("payload,code", [
    (b"{not json", "invalid_json"),
    (json.dumps({"prompt": "x"}), "invalid_request"),  # no id
    (json.dumps({"id": "b1", "prompt": 5}), "invalid_request"),
    (json.dumps({"id": "b2", "prompt": "x", "bogus": 1}), "invalid_request"),
    (json.dumps({"id": "b3", "prompt": "x" * 600}), "too_large"),
    (json.dumps({"id": "b4", "prompt": "x", "pad": "y" * 9000}), "too_large"),
    (json.dumps({"id": "b5", "prompt": "x", "adapters": [{"name": "nope"}]}), "unknown_adapter"),
    (json.dumps({"id": "b6", "prompt": "x", "max_tokens": 0}), "invalid_request"),
    (json.dumps({"id": "b7", "prompt": "x", "max_tokens": 10**6}), "invalid_request"),
    (json.dumps({"id": "b8", "prompt": "x", "temperature": "hot"}), "invalid_request"),
])
def test_bad_input_gets_error_and_daemon_keeps_serving(broker, daemon, payload, code):
    c = Client(broker)
    c.send("nomoat/f/d1/prompt", payload)
    msgs = c.until_done()
    err = msgs[-1][1]
    assert err["error"]["code"] == code, err
    c.send("nomoat/f/d1/prompt", {"id": "good", "prompt": "hi", "max_tokens": 3})
    assert c.until_done("good")[-1][1]["finish_reason"] in ("stop", "length")
    c.close()


def test_queue_full_replies_busy_and_cancel(broker, model):
    d = Daemon(Generator(model), profile(broker, queue_size=1))
    # hold the worker inside its first request (the real model still runs) so the queue state is known
    gate, real_step = threading.Event(), d.gen.decode_one_token
    d.gen.model.profile.draft_tokens = 0  # every token through decode_one_token (no drafted passes)
    d.gen.decode_one_token = lambda *a: (gate.wait(20), real_step(*a))[1]
    d.start()
    wait_status(broker, "d1", "online")
    c = Client(broker)
    try:
        c.send("nomoat/f/d1/prompt", {"id": "long", "prompt": "a", "max_tokens": 64, "stop": ["<never>"]})
        end = time.time() + 10
        while d.current is None and time.time() < end:
            time.sleep(0.01)
        c.send("nomoat/f/d1/prompt", {"id": "queued", "prompt": "b", "max_tokens": 2})
        c.send("nomoat/f/d1/prompt", {"id": "overflow", "prompt": "c", "max_tokens": 2})
        c.send("nomoat/f/d1/cancel", {"id": "long"}, correlation=None, response=False)
        c.send("nomoat/f/d1/cancel", b"garbage", correlation=None, response=False)
        time.sleep(0.3)
        gate.set()
        finals = {}
        end = time.time() + 30
        while len(finals) < 3 and time.time() < end:
            for _, m, _ in c.until_done():
                if m.get("done"):
                    finals[m["id"]] = m
        assert finals["overflow"]["error"]["code"] == "busy"
        assert finals["long"]["finish_reason"] == "cancelled"
        assert finals["queued"]["finish_reason"] in ("stop", "length")
    finally:
        gate.set()
        c.close()
        d.stop()


def test_shared_subscription_each_pooled_prompt_answered_once(broker, model):
    daemons = [Daemon(Generator(model), profile(broker, device=name)) for name in ("d1", "d2")]
    for d in daemons:
        d.start()
    for name in ("d1", "d2"):
        wait_status(broker, name, "online")
    c = Client(broker)
    try:
        ids = [f"p{i}" for i in range(8)]
        for rid in ids:
            c.send("nomoat/f/prompt", {"id": rid, "prompt": "x", "max_tokens": 2, "stream": False})
        finals = []
        end = time.time() + 30
        while len(finals) < len(ids) and time.time() < end:
            try:
                _, m, _ = c.inbox.get(timeout=1)
            except queue.Empty:
                continue
            if m.get("done"):
                finals.append(m["id"])
        time.sleep(0.5)
        while not c.inbox.empty():
            finals.append(c.inbox.get()[1]["id"])
        assert sorted(finals) == sorted(ids)  # each exactly once
    finally:
        c.close()
        for d in daemons:
            d.stop()


def serve_process(broker, model, device="d9", env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "nomoat", "serve", str(model), "--broker", broker.url,
                             "--fleet", "f", "--device", device], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_sigterm_publishes_offline_and_offline_prompts_are_answered_later(broker, model):
    proc = serve_process(broker, model)
    try:
        wait_status(broker, "d9", "online", timeout=60)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert wait_status(broker, "d9", "offline")["state"] == "offline"
        c = Client(broker)
        c.send("nomoat/f/d9/prompt", {"id": "while-down", "prompt": "hi", "max_tokens": 3})
        proc = serve_process(broker, model)  # persistent session: the broker kept the prompt
        assert c.until_done("while-down", timeout=60)[-1][1]["finish_reason"] in ("stop", "length")
        c.close()
    finally:
        proc.kill()
        proc.wait()


def test_last_will_reports_offline_on_crash(broker, model):
    proc = serve_process(broker, model, device="d8")
    try:
        wait_status(broker, "d8", "online", timeout=60)
        proc.kill()  # no clean shutdown: the broker publishes the will after the keepalive lapses
        proc.wait()
        assert wait_status(broker, "d8", "offline", timeout=60)["state"] == "offline"
    finally:
        proc.kill()


def test_broker_restart_mid_stream(broker, daemon):
    c = Client(broker)
    c.send("nomoat/f/d1/prompt", {"id": "cut", "prompt": "a", "max_tokens": 64, "temperature": 1.0, "seed": 2,
                                  "stop": ["<never>"]})
    time.sleep(0.1)
    broker.stop()
    time.sleep(0.5)
    broker.start()
    c.close()
    c = Client(broker)
    # the daemon reconnects (backoff) and answers new requests
    deadline = time.time() + 40
    while time.time() < deadline:
        c.send("nomoat/f/d1/prompt", {"id": f"after-{int(time.time() * 1000)}", "prompt": "hi", "max_tokens": 2})
        try:
            msgs = c.until_done(timeout=5)
            if msgs[-1][1].get("finish_reason"):
                break
        except AssertionError:
            continue
    else:
        raise AssertionError("daemon did not come back after the broker restart")
    c.close()


# ---- hostile input: every message gets one answer (where it names a way to answer), and the daemon stays up --
@pytest.mark.parametrize("payload,code", [
    (b'{"id": "p2\\n", "prompt": "x"}', "invalid_request"),  # "$" matched before a final newline
    (b'{"id": "deep", "prompt": ' + b"[" * 3000 + b"]" * 3000 + b"}", "invalid_json"),  # RecursionError
    (b'{"id": "bigint", "prompt": "x", "seed": ' + b"9" * 5000 + b"}", "invalid_json"),  # 4300+ digits
    (b'{"id": "nan", "prompt": "x", "temperature": NaN}', "invalid_json"),
    (json.dumps({"id": "tiny-t", "prompt": "x", "temperature": 1e-300, "min_p": 0.1}), "invalid_request"),
    (b'{"id": "inf-t", "prompt": "x", "deadline": 1e999}', "invalid_request"),
    (b'{"id": "surrogate", "prompt": "a\\ud800b"}', "invalid_request"),
    (json.dumps({"id": "neg-seed", "prompt": "x", "seed": -1}), "invalid_request"),
    (json.dumps({"id": "huge-seed", "prompt": "x", "seed": 2**70}), "invalid_request"),
    (json.dumps({"id": "role", "messages": [{"role": "x", "content": "y", "extra": 1}], "stop": [""]}),
     "invalid_request"),
    (json.dumps({"id": "robot", "messages": [{"role": "robot", "content": "y"}]}), "invalid_request"),
])
def test_hostile_payloads_answered_with_an_error_code_not_internal(broker, daemon, payload, code):
    c = Client(broker)
    c.send("nomoat/f/d1/prompt", payload)
    err = c.until_done()[-1][1]
    assert err["error"]["code"] == code, err
    c.send("nomoat/f/d1/prompt", {"id": "good", "prompt": "hi", "max_tokens": 3})
    assert c.until_done("good")[-1][1]["finish_reason"] in ("stop", "length")
    assert daemon.disconnects == 0
    c.close()


class Watch:
    """Every message published on the broker under some filters (to see what the daemon published where)."""

    def __init__(self, broker, *filters):
        self.got: list[tuple[str, bytes]] = []
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.c.on_message = lambda c, u, m: self.got.append((m.topic, m.payload))
        self.c.connect("127.0.0.1", broker.port)
        for f in filters:
            self.c.subscribe(f, qos=1)
        self.c.loop_start()
        time.sleep(0.3)

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


@pytest.mark.parametrize("response", [
    "x/y/#", "+", "nomoat/f/d1/prompt", "nomoat/f/d1/cancel", "nomoat/f/d1/status", "nomoat/f/d2/prompt",
    "nomoat/f/prompt", "nomoat/f/adapters/a1", "$SYS/x",
])
def test_refused_response_topics_answered_on_the_fallback_topic(broker, daemon, response):
    watch = Watch(broker, "nomoat/#", "x/#", "+")
    c = Client(broker)
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = response
    props.CorrelationData = b"k"
    c.c.publish("nomoat/f/d1/prompt", json.dumps({"id": "rt", "prompt": "hi", "max_tokens": 3}), qos=1,
                properties=props).wait_for_publish(5)
    topic, err, corr = c.until_done("rt")[-1]
    assert topic == "nomoat/f/d1/reply/rt" and corr == b"k"
    assert err["error"]["code"] == "invalid_request" and "refused" in err["error"]["message"]
    # the worker is alive and nothing went to the refused topic
    c.send("nomoat/f/d1/prompt", {"id": "after", "prompt": "hi", "max_tokens": 3})
    assert c.until_done("after")[-1][1]["finish_reason"] in ("stop", "length")
    assert wait_status(broker, "d1", "online")["queue"] == 0
    published = [t for t, _ in watch.got]
    assert published.count("nomoat/f/d1/prompt") == 2  # the two prompts sent here, no reply
    assert published.count(response) == (2 if response == "nomoat/f/d1/prompt" else
                                         published.count("nomoat/f/d1/status") if response.endswith("status") else 0)
    assert daemon.disconnects == 0
    watch.close()
    c.close()


def mosquitto_client(name: str) -> str | None:
    import shutil

    return shutil.which(name)


@pytest.mark.skipif(not mosquitto_client("mosquitto_pub"), reason="mosquitto-clients are not installed")
@pytest.mark.parametrize("version,qos", [("mqttv5", 0), ("mqttv311", 0), ("mqttv5", 1), ("mqttv311", 2),
                                         ("mqttv5", 2)])
def test_mosquitto_pub_at_every_qos_is_answered_without_a_disconnect(broker, daemon, version, qos):
    """Clients nobody here wrote: QoS 0 is Home Assistant's and Node-RED's default (a PUBACK for it is a
    protocol error that gets the daemon disconnected)."""
    rid = f"mp-{version}-{qos}"
    sub = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port), "-V", "mqttv311", "-q", "1",
                            "-t", f"nomoat/f/d1/reply/{rid}", "-C", "1", "-W", "30"], stdout=subprocess.PIPE,
                           text=True)
    time.sleep(0.3)
    subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-V", version, "-q", str(qos),
                    "-t", "nomoat/f/d1/prompt", "-m", json.dumps({"id": rid, "prompt": "Hi", "max_tokens": 4,
                                                                  "stream": False})], check=True, timeout=10)
    out, _ = sub.communicate(timeout=40)
    assert json.loads(out)["finish_reason"] in ("stop", "length")
    time.sleep(0.5)
    assert daemon.disconnects == 0
    assert wait_status(broker, "d1", "online")["state"] == "online"


def test_an_id_ending_in_a_newline_without_response_topic_does_not_disconnect(broker, daemon):
    """The fallback reply topic would be malformed; Mosquitto then disconnects the daemon, which republished it
    on every reconnect. Such a request names no way to answer: it is logged and acknowledged."""
    c = Client(broker)
    c.send("nomoat/f/d1/prompt", b'{"id": "p2\\n", "prompt": "x", "max_tokens": 2}', response=False)
    c.send("nomoat/f/d1/prompt", {"id": "good", "prompt": "hi", "max_tokens": 3})
    msgs = c.until_done("good")
    assert [m["id"] for _, m, _ in msgs if m.get("done")] == ["good"]
    time.sleep(1.0)
    assert daemon.disconnects == 0
    c.close()


def test_a_second_daemon_with_the_same_device_name_stops_the_first_with_a_clear_error(broker, model):
    """Both would use the client id nomoat-f-d7 and take the session from each other every second, for ever."""
    first = serve_process(broker, model, device="d7")
    second = None
    try:
        wait_status(broker, "d7", "online", timeout=60)
        second = serve_process(broker, model, device="d7")
        out, _ = first.communicate(timeout=60)
        assert first.returncode == 1 and "another process serves as fleet" in out, out
        time.sleep(2.0)
        assert wait_status(broker, "d7", "online")["state"] == "online"  # the second one serves
        c = Client(broker)
        c.send("nomoat/f/d7/prompt", {"id": "to-second", "prompt": "hi", "max_tokens": 2})
        assert c.until_done("to-second", timeout=30)[-1][1]["finish_reason"] in ("stop", "length")
        c.close()
        assert second.poll() is None
    finally:
        for p in (first, second):
            if p:
                p.kill()
                p.wait()


def test_a_spoofed_or_stale_status_does_not_stop_the_daemon_and_its_own_status_comes_back(broker, daemon):
    from nomoat.edge.client import publish_all

    for started in (time.time() + 100, 1.0):  # a newer instance that never took the session; a crashed old run
        fake = {"state": "online", "device": "d1", "instance": "someoneelse", "started": started}
        publish_all(daemon.profile.mqtt, [("nomoat/f/d1/status", json.dumps(fake).encode())])
        time.sleep(1.0)
        assert not daemon.fatal and daemon.disconnects == 0
        status = wait_status(broker, "d1", "online")
        assert status["instance"] == daemon.instance  # the retained status is the live process's again


def test_error_codes_come_from_the_error_not_its_wording(broker, exported):
    """'has no LoRA slots' names an adapter but is no unknown adapter: the request asks what this model cannot do."""
    d = Daemon(Generator(exported("fp32-base", precision="fp32")), profile(broker, device="d6"))
    d.start()
    wait_status(broker, "d6", "online")
    c = Client(broker)
    try:
        c.send("nomoat/f/d6/prompt", {"id": "noslots", "prompt": "x", "adapters": [{"name": "a1"}]})
        err = c.until_done("noslots")[-1][1]["error"]
        assert err["code"] == "invalid_request" and "no LoRA slots" in err["message"]
    finally:
        c.close()
        d.stop()


def gated(d: Daemon, seconds_per_token: float = 0.0) -> threading.Event:
    """Hold the daemon's generation before each token until the returned event is set (or slow it down)."""
    gate, real_step = threading.Event(), d.gen.decode_one_token
    d.gen.model.profile.draft_tokens = 0  # every token through decode_one_token (no drafted passes)

    def step(*a):
        gate.wait(20)
        time.sleep(seconds_per_token)
        return real_step(*a)

    d.gen.decode_one_token = step
    return gate


def test_a_graceful_stop_hands_requests_back_and_a_restart_answers_them(broker, model):
    """SIGTERM (`systemctl restart`) must not lose the request it interrupts: QoS 1 comes back from the broker
    after the restart (the client is told the stream was interrupted), QoS 0 gets `unavailable`."""
    want = Generator(model).generate("The capital", max_tokens=8).text
    d = Daemon(Generator(model), profile(broker))
    gate = gated(d)
    d.start()
    wait_status(broker, "d1", "online")
    c = Client(broker)
    try:
        c.send("nomoat/f/d1/prompt", {"id": "long", "prompt": "The capital", "max_tokens": 8})
        end = time.time() + 10
        while d.current is None and time.time() < end:
            time.sleep(0.01)
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic, props.CorrelationData = c.reply_topic, b"q0"
        c.c.publish("nomoat/f/d1/prompt", json.dumps({"id": "queued-q0", "prompt": "x", "max_tokens": 2}), qos=0,
                    properties=props)
        c.send("nomoat/f/d1/prompt", {"id": "queued-q1", "prompt": "x", "max_tokens": 2})
        time.sleep(0.3)
        stopper = threading.Thread(target=d.stop)
        stopper.start()
        time.sleep(0.2)
        gate.set()
        stopper.join(30)
        got = c.until_done("queued-q0")
        assert got[-1][1]["error"]["code"] == "unavailable"
        assert {"id": "long", "interrupted": "shutdown"} in [m for _, m, _ in got]
        assert not [m for _, m, _ in got if m.get("done") and m["id"] != "queued-q0"]
        d = Daemon(Generator(model), profile(broker))  # the restart: the broker delivers both QoS 1 prompts again
        d.start()
        finals = {}
        end = time.time() + 30
        while len(finals) < 2 and time.time() < end:
            for _, m, _ in c.until_done(timeout=end - time.time()):
                if m.get("done"):
                    finals[m["id"]] = m
        assert finals["long"]["text"] == want and finals["queued-q1"]["finish_reason"] in ("stop", "length")
    finally:
        gate.set()
        c.close()
        d.stop()


def test_a_deadline_reached_while_generating_is_not_a_cancel(broker, model):
    d = Daemon(Generator(model), profile(broker))
    gate = gated(d, seconds_per_token=0.05)
    gate.set()
    d.start()
    wait_status(broker, "d1", "online")
    c = Client(broker)
    try:
        c.send("nomoat/f/d1/prompt", {"id": "dl", "prompt": "a", "max_tokens": 60, "stop": ["<never>"],
                                      "deadline": time.time() + 0.5})
        final = c.until_done("dl")[-1][1]
        assert final["finish_reason"] == "deadline" and 0 < final["usage"]["completion_tokens"] < 60
    finally:
        c.close()
        d.stop()


def test_repeated_ids_a_retry_gets_the_answer_marked_another_request_gets_duplicate_id(broker, model):
    d = Daemon(Generator(model), profile(broker))
    gate = gated(d)
    d.start()
    wait_status(broker, "d1", "online")
    first, retry = Client(broker), Client(broker)  # the retry comes with a fresh reply topic, as after a timeout
    req = {"id": "same", "prompt": "The capital", "max_tokens": 6}
    try:
        first.send("nomoat/f/d1/prompt", req)
        end = time.time() + 10
        while d.current is None and time.time() < end:
            time.sleep(0.01)
        retry.send("nomoat/f/d1/prompt", req, correlation=b"retry")  # while it runs
        retry.send("nomoat/f/d1/prompt", {**req, "prompt": "other"}, correlation=b"other")  # another request
        time.sleep(0.3)
        gate.set()
        original = first.until_done("same")[-1][1]
        got = {corr: m for _, m, corr in retry.until_done("same") + retry.until_done("same") if m.get("done")}
        assert got[b"other"]["error"]["code"] == "duplicate_id"
        assert got[b"retry"]["repeat"] is True and got[b"retry"]["text"] == original["text"]
        assert "repeat" not in original
        retry.send("nomoat/f/d1/prompt", req, correlation=b"later")  # after it finished
        later = retry.until_done("same")[-1]
        assert later[2] == b"later" and later[1]["repeat"] is True and later[1]["text"] == original["text"]
        retry.send("nomoat/f/d1/prompt", {**req, "max_tokens": 5}, correlation=b"changed")
        assert retry.until_done("same")[-1][1]["error"]["code"] == "duplicate_id"
    finally:
        gate.set()
        first.close()
        retry.close()
        d.stop()


def retained(broker, topic, timeout=5.0) -> bytes | None:
    box: queue.Queue = queue.Queue()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.on_message = lambda cl, u, m: box.put(m.payload)
    c.connect("127.0.0.1", broker.port)
    c.subscribe(topic, qos=1)
    c.loop_start()
    try:
        return box.get(timeout=timeout)
    except queue.Empty:
        return None
    finally:
        c.disconnect()
        c.loop_stop()


def test_the_pool_fails_over_when_a_device_is_killed_and_availability_says_so(broker, model):
    """With the pool on the devices' persistent sessions, Mosquitto kept handing a dead device its share of the
    pool's prompts (for the session expiry, a day): half of them waited."""
    procs = {n: serve_process(broker, model, device=n) for n in ("pa", "pb")}
    c = Client(broker)
    try:
        for n in procs:
            wait_status(broker, n, "online", timeout=60)
        assert retained(broker, "nomoat/f/pb/availability") == b"online"
        procs["pb"].kill()  # kill -9: no clean shutdown
        procs["pb"].wait()
        time.sleep(0.5)
        assert retained(broker, "nomoat/f/pb/availability") == b"offline"  # its Last Will
        start, answered = time.time(), {}
        for i in range(6):
            c.send("nomoat/f/prompt", {"id": f"pool{i}", "prompt": "x", "max_tokens": 2, "stream": False})
        while len(answered) < 6 and time.time() < start + 20:
            try:
                _, m, _ = c.inbox.get(timeout=1)
            except queue.Empty:
                continue
            if m.get("done"):
                answered[m["id"]] = time.time() - start
        assert sorted(answered) == [f"pool{i}" for i in range(6)], answered
        print(f"\npool with one of two devices dead: 6 prompts answered in {max(answered.values()):.2f} s")
    finally:
        c.close()
        for p in procs.values():
            p.kill()
            p.wait()


def test_serve_drafts_with_the_draft_model_in_the_users_config(broker, exported, tmp_path):
    """`draft_model` and `kv_cache` in the user's config file: the daemon says so, answers over MQTT with the plain
    greedy answer of that cache, and its final timings count the drafts (the model drafting for itself: its drafts
    are taken)."""
    model = exported("int4-level1", accuracy_level=1)
    cfg, board = tmp_path / "nomoat.toml", tmp_path / "board.toml"
    cfg.write_text(f'draft_model = "{model}"\nkv_cache = "int8"\n')
    board.write_text("accuracy_level = 1\n")  # (the x86 profile serve would pick runs level 4, rounding otherwise)
    proc = subprocess.Popen([sys.executable, "-m", "nomoat", "serve", str(model), "--config", str(cfg), "--broker",
                             broker.url, "--fleet", "f", "--device", "d7", "--profile", str(board)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    c = None
    try:
        status = wait_status(broker, "d7", "online", timeout=60)
        assert status["draft_model"] == model.name and status["kv_cache"] == "int8"
        c = Client(broker)
        c.send("nomoat/f/d7/prompt", {"id": "drafted", "prompt": "The capital of France is", "max_tokens": 24})
        final = c.until_done("drafted", timeout=60)[-1][1]
        want = Generator(model, Profile(kv_cache="int8")).generate("The capital of France is", max_tokens=24,
                                                                   draft_tokens=0)
        assert final["text"] == want.text
        assert final["timings"]["accepted"] > 0
        assert final["timings"]["passes"] <= final["usage"]["completion_tokens"] / 2  # its own drafts are taken
    finally:
        if c:
            c.close()
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert f"drafts by {model.name}" in out, out
