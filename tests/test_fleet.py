"""Fleet adapter push over a real Mosquitto: signed, chunked, resumable, hot-swapped."""

from __future__ import annotations

import json
import queue
import time

import paho.mqtt.client as mqtt
import pytest
from conftest import mosquitto_path
from nomoat.edge.client import publish_all
from nomoat.edge.daemon import Daemon
from nomoat.edge.fleet import build_push, control_manifest, generate_key, load_key
from nomoat.edge.generate import Generator
from nomoat.edge.profile import MqttSettings
from nomoat.edge.updater import AdapterUpdater
from test_daemon import Broker, Client, profile, wait_status

pytestmark = [pytest.mark.mqtt, pytest.mark.skipif(not mosquitto_path(), reason="mosquitto is not installed")]


def start_device(broker, model, name, store, pub):
    p = profile(broker, device=name)
    p.trusted_keys = [pub]
    d = Daemon(Generator(model), p)
    AdapterUpdater(d, store)
    d.start()
    wait_status(broker, name, "online")
    return d


class Events:
    def __init__(self, broker):
        self.q: queue.Queue = queue.Queue()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.c.on_message = lambda c, u, m: self.q.put(json.loads(m.payload))
        self.c.connect("127.0.0.1", broker.port)
        self.c.subscribe("nomoat/f/+/events", qos=1)
        self.c.loop_start()
        time.sleep(0.3)

    def wait(self, event, device=None, timeout=20) -> dict:
        """The first matching event not yet returned (events of other devices are kept for later)."""
        end = time.time() + timeout
        self.seen = getattr(self, "seen", [])
        while time.time() < end:
            for e in self.seen:
                if e["event"] == event and (device is None or e["device"] == device):
                    self.seen.remove(e)
                    return e
            try:
                self.seen.append(self.q.get(timeout=0.5))
            except queue.Empty:
                continue
        raise AssertionError(f"no {event} event from {device}")

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


def push(broker, adapter_file, key_path, version=1, name="a1", chunk_size=1024, activate=True, only=None,
         tamper=None, manifest_edit=None):
    from nomoat.edge.adapters import read_meta

    meta = read_meta(adapter_file)
    manifest, chunks = build_push(adapter_file, name, version, meta["base_model_hash"], load_key(key_path),
                                  chunk_size, activate)
    if manifest_edit:
        manifest = manifest_edit(manifest)
    base = f"nomoat/f/adapters/{name}"
    msgs = [(f"{base}/{version}/{i}", (tamper if tamper and i == 1 else c)) for i, c in enumerate(chunks)]
    if only is not None:
        msgs = [msgs[i] for i in only]
    publish_all(MqttSettings(broker=broker.url, fleet="f"), [*msgs, (base, json.dumps(manifest).encode())])
    return manifest, chunks


def ask(broker, device, adapters=None, prompt="The capital"):
    c = Client(broker)
    req = {"id": f"q{time.time_ns()}", "prompt": prompt, "max_tokens": 12}
    if adapters is not None:
        req["adapters"] = adapters
    c.send(f"nomoat/f/{device}/prompt", req)
    text = c.until_done(req["id"])[-1][1]
    c.close()
    return text


def test_push_to_two_devices_installs_activates_and_matches_merged(broker, slots, adapter_file, key, adapters,
                                                                     exported, tmp_path):
    key_path, pub = key
    ev = Events(broker)
    devices = [start_device(broker, slots, n, tmp_path / n, pub) for n in ("d1", "d2")]
    try:
        base_text = ask(broker, "d1")["text"]
        manifest, chunks = push(broker, adapter_file, key_path)
        assert len(chunks) > 1
        ev.wait("activated", "d1")
        ev.wait("activated", "d2")
        merged = exported("merged-a1", precision="fp32", loras=[(adapters[0], 1.0)])
        want = Generator(merged).generate("The capital", max_tokens=12).text
        assert ask(broker, "d2", [{"name": "a1", "scale": 1.0}])["text"] == want
        assert ask(broker, "d1")["text"] == want != base_text  # activated: the default
        st = wait_status(broker, "d1", "online")
        assert st["installed"] == {"a1": 1} and st["last_push"]["event"] == "activated"
    finally:
        for d in devices:
            d.stop()
        ev.close()


@pytest.mark.parametrize("case,reason", [
    ("bad_signature", "bad signature"),
    ("unknown_key", "unknown key"),
    ("lower_version", "version 1 is not newer than 2"),
    ("other_base", "another base model"),
])
def test_bad_pushes_rejected_previous_adapter_stays(broker, slots, adapter_file, key, tmp_path, case, reason):
    key_path, pub = key
    ev = Events(broker)
    d = start_device(broker, slots, "d1", tmp_path / "store", pub)
    try:
        push(broker, adapter_file, key_path, version=2)
        ev.wait("activated", "d1")
        good = ask(broker, "d1")["text"]
        kw = {}
        if case == "bad_signature":
            kw = {"version": 3, "manifest_edit": lambda m: {**m, "scale": 5.0}}
        elif case == "unknown_key":
            other = tmp_path / "other.key"
            generate_key(other)
            push(broker, adapter_file, other, version=3)
            assert reason in ev.wait("rejected", "d1")["reason"]
            assert ask(broker, "d1")["text"] == good
            return
        elif case == "lower_version":
            kw = {"version": 1}
        elif case == "other_base":
            from nomoat.edge.fleet import sign

            kw = {"version": 3, "manifest_edit": lambda m: sign({**m, "base_model_hash": "0" * 64},
                                                                 load_key(key_path))}
        push(broker, adapter_file, key_path, **kw)
        assert reason in ev.wait("rejected", "d1")["reason"]
        assert ask(broker, "d1")["text"] == good
        assert wait_status(broker, "d1", "online")["installed"] == {"a1": 2}
    finally:
        d.stop()
        ev.close()


def test_push_resumes_after_daemon_restart_and_offline_device_catches_up(broker, slots, adapter_file, key,
                                                                         tmp_path):
    key_path, pub = key
    ev = Events(broker)
    d = start_device(broker, slots, "d1", tmp_path / "s1", pub)
    manifest, chunks = push(broker, adapter_file, key_path, only=[0, 1])  # half a push
    ev.wait("received", "d1")
    time.sleep(0.5)
    d.stop()
    parts = list((tmp_path / "s1" / ".partial").glob("*/*.chunk"))
    assert len(parts) == 2
    # the rest of the chunks arrive while the device is down; retained, they reach it on restart
    push(broker, adapter_file, key_path, only=list(range(2, len(chunks))))
    d = start_device(broker, slots, "d1", tmp_path / "s1", pub)
    late = start_device(broker, slots, "d3", tmp_path / "s3", pub)  # was never online during the push
    try:
        ev.wait("activated", "d1")
        ev.wait("activated", "d3")
    finally:
        d.stop()
        late.stop()
        ev.close()
    # restart again: the installed adapter is loaded from the store and is still the default
    d = start_device(broker, slots, "d1", tmp_path / "s1", pub)
    try:
        assert d.default_adapters == (("a1", 1.0),)
    finally:
        d.stop()


def test_push_through_broker_with_128k_message_limit(tmp_path, slots, adapter_file, key):
    key_path, pub = key
    b = Broker(tmp_path, extra="message_size_limit 131072\n")
    ev = Events(b)
    d = start_device(b, slots, "d1", tmp_path / "store", pub)
    try:
        push(b, adapter_file, key_path, chunk_size=128 * 1024)
        ev.wait("activated", "d1")
    finally:
        d.stop()
        ev.close()
        b.stop()


def test_rollback_and_remove(broker, slots, adapter_file, key, tmp_path):
    key_path, pub = key
    ev = Events(broker)
    d = start_device(broker, slots, "d1", tmp_path / "store", pub)
    try:
        push(broker, adapter_file, key_path, version=1)
        ev.wait("activated", "d1")
        push(broker, adapter_file, key_path, version=2)
        ev.wait("activated", "d1")
        publish_all(MqttSettings(broker=broker.url, fleet="f"),
                    [("nomoat/f/adapters/a1", json.dumps(control_manifest("rollback", "a1", 1, load_key(key_path))).encode())])
        assert ev.wait("rolled_back", "d1")["version"] == 1
        publish_all(MqttSettings(broker=broker.url, fleet="f"),
                    [("nomoat/f/adapters/a1", json.dumps(control_manifest("remove", "a1", 0, load_key(key_path))).encode())])
        ev.wait("removed", "d1")
        assert ask(broker, "d1", [{"name": "a1"}])["error"]["code"] == "unknown_adapter"
    finally:
        d.stop()
        ev.close()


def test_cli_push_waits_for_the_fleet(broker, slots, adapter_file, key, tmp_path):
    from click.testing import CliRunner
    from nomoat.edge.cli import main

    key_path, pub = key
    devices = [start_device(broker, slots, n, tmp_path / n, pub) for n in ("d1", "d2")]
    try:
        args = ["fleet", "push", str(adapter_file), "--name", "a1", "--fleet", "f", "--broker", broker.url,
                "--key", str(key_path), "--activate", "--chunk-size", "2048", "--wait-for", "2", "--timeout", "30"]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        lines = [line.split() for line in result.output.splitlines()[1:]]
        assert sorted(line[0] for line in lines) == ["d1", "d2"] and {line[1] for line in lines} == {"activated"}
        # a third device that does not exist: the command waits, then says so and fails
        result = CliRunner().invoke(main, [*args[:-4], "--version", "2", "--wait-for", "3", "--timeout", "3"])
        assert result.exit_code == 1 and "2 of 3 devices activated" in result.output
    finally:
        for d in devices:
            d.stop()


def test_cli_fleet_commands_use_the_fleets_topic_prefix(broker, slots, adapter_file, key, tmp_path):
    from click.testing import CliRunner
    from nomoat.edge.cli import main

    key_path, pub = key
    p = profile(broker, device="d1")
    p.mqtt.prefix, p.trusted_keys = "acme", [pub]
    d = Daemon(Generator(slots), p)
    AdapterUpdater(d, tmp_path / "store")
    d.start()
    try:
        args = ["fleet", "--prefix", "acme", "push", str(adapter_file), "--name", "a1", "--fleet", "f", "--broker",
                broker.url, "--key", str(key_path), "--activate", "--wait-for", "1", "--timeout", "30"]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0 and "activated" in result.output, result.output
        result = CliRunner().invoke(main, ["fleet", "--prefix", "acme", "status", "--fleet", "f", "--broker",
                                           broker.url, "--wait", "1"])
        assert "a1@v1" in result.output, result.output
    finally:
        d.stop()


def test_a_push_during_a_stream_changes_nothing_in_it_and_applies_to_the_next_request(broker, slots, adapter_file,
                                                                                     key, adapters, exported,
                                                                                     tmp_path):
    """The worker owns the model's adapters: an install/activation waits for the running request, whose every
    token comes from the adapter set it started with."""
    from test_daemon import Client, gated

    key_path, pub = key
    ev = Events(broker)
    p = profile(broker, device="d1")
    p.trusted_keys = [pub]
    d = Daemon(Generator(slots), p)
    AdapterUpdater(d, tmp_path / "store")
    gate = gated(d, seconds_per_token=0.03)
    gate.set()
    d.start()
    wait_status(broker, "d1", "online")
    c = Client(broker)
    try:
        base = Generator(slots).generate("The capital", max_tokens=40, stop=["<never>"]).text
        c.send("nomoat/f/d1/prompt", {"id": "long", "prompt": "The capital", "max_tokens": 40, "stop": ["<never>"]})
        end = time.time() + 10
        while d.current is None and time.time() < end:
            time.sleep(0.01)
        push(broker, adapter_file, key_path, version=1, activate=True)
        final = c.until_done("long")[-1][1]
        arrived = time.time()
        activated = ev.wait("activated", "d1")
        assert final["text"] == base  # no token of it saw the new adapter
        assert activated["ts"] >= arrived - 0.5  # installed after the stream, not during it
        merged = exported("merged-a1", precision="fp32", loras=[(adapters[0], 1.0)])
        want = Generator(merged).generate("The capital", max_tokens=12).text
        assert ask(broker, "d1")["text"] == want
    finally:
        c.close()
        d.stop()
        ev.close()


def test_operator_commands_without_a_broker_say_so(adapter_file, key, monkeypatch):
    """fleet push / status / remove with nothing listening: the reason and exit status 1, not a traceback
    (push ended in queue.Empty)."""
    from click.testing import CliRunner
    from nomoat.edge import client
    from nomoat.edge.cli import main
    from test_daemon import free_port

    monkeypatch.setattr(client, "CONNECT_TIMEOUT", 1.0)
    where = ["--broker", f"mqtt://127.0.0.1:{free_port()}", "--fleet", "f"]
    for args in (["push", str(adapter_file), "--name", "a1", "--key", str(key[0])],
                 ["push", str(adapter_file), "--name", "a1", "--key", str(key[0]), "--wait-for", "1"],
                 ["status", "--wait", "0.1"], ["remove", "a1", "--key", str(key[0])]):
        out = CliRunner().invoke(main, ["fleet", *args, *where])
        assert out.exit_code == 1 and "cannot reach the broker" in out.output, (args, out.output, out.exception)


def test_a_new_order_clears_the_retained_chunks_of_the_push_it_replaces(broker, slots, adapter_file, key, tmp_path):
    """Every push left its chunks retained for ever (on a bridged fleet: on every broker, fetched again at each
    bridge reconnect). A new push clears the previous version's chunks once its manifest has replaced the old
    one; a removal clears the last push's. A device offline through both pushes still installs the latest."""
    from click.testing import CliRunner
    from nomoat.edge.cli import main
    from nomoat.edge.client import collect_raw

    key_path, pub = key
    settings = MqttSettings(broker=broker.url, fleet="f")
    where = ["--fleet", "f", "--broker", broker.url]

    def retained() -> dict[str, int]:
        return {t: len(p) for t, p in collect_raw(settings, "nomoat/f/adapters/#", 0.5).items()}

    def push(version: int):
        out = CliRunner().invoke(main, ["fleet", "push", str(adapter_file), "--name", "a1", "--key", str(key_path),
                                        "--version", str(version), "--chunk-size", "2048", *where])
        assert out.exit_code == 0, out.output
        return out.output

    push(1)
    v1 = retained()
    assert len(v1) > 2 and all(p > 0 for p in v1.values())
    assert "cleared the" in push(2)
    v2 = retained()
    assert {t for t in v2 if "/a1/1/" in t} == set() and len({t for t in v2 if "/a1/2/" in t}) == len(v1) - 1
    assert "cleared" not in push(2)  # the same version again: its own chunks stay
    events = Events(broker)
    d = start_device(broker, slots, "late", tmp_path / "late", pub)  # offline through both pushes
    try:
        assert events.wait("installed", "late")["version"] == 2
    finally:
        d.stop()
        events.close()
    out = CliRunner().invoke(main, ["fleet", "remove", "a1", "--key", str(key_path), *where])
    assert out.exit_code == 0 and "cleared the" in out.output, out.output
    assert list(retained()) == ["nomoat/f/adapters/a1"]  # the signed removal order alone
