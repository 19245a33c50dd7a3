"""Fleet push against an attacker who can publish anything on the broker and replay what it saw, but holds no
signing key (TUF's threat model). Real Mosquitto, real daemons, real files."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time

import pytest
from conftest import mosquitto_path
from nomoat.edge.client import publish_all
from nomoat.edge.fleet import control_manifest, load_key, sign
from nomoat.edge.profile import MqttSettings
from test_daemon import Broker, wait_status
from test_fleet import Events, ask, push, start_device

pytestmark = [pytest.mark.mqtt, pytest.mark.skipif(not mosquitto_path(), reason="mosquitto is not installed")]


@contextlib.contextmanager
def device(broker, slots, store, pub):
    """A device d1 with its adapter store, and a watcher of the fleet's events."""
    ev = Events(broker)
    d = start_device(broker, slots, "d1", store, pub)
    try:
        yield d, ev
    finally:
        d.stop()
        ev.close()


def publish(broker, messages, retain=True):
    publish_all(MqttSettings(broker=broker.url, fleet="f"), messages, retain=retain)


def control(broker, key_path, action, version, name="a1") -> list[tuple[str, bytes]]:
    """Publish a signed control order; returns its message, as an attacker would record it."""
    msg = [(f"nomoat/f/adapters/{name}", json.dumps(control_manifest(action, name, version, load_key(key_path))).encode())]
    publish(broker, msg)
    return msg


def recorded(manifest, chunks) -> list[tuple[str, bytes]]:
    """A push's retained messages as anyone subscribed to the fleet's adapter topics saw them."""
    base = f"nomoat/f/adapters/{manifest['name']}"
    return [*[(f"{base}/{manifest['version']}/{i}", c) for i, c in enumerate(chunks)],
            (base, json.dumps(manifest).encode())]


def forged(key_path, adapter_file, name: str, **fields) -> tuple[dict, list[tuple[str, bytes]]]:
    """A correctly signed manifest with whatever fields an operator's buggy tool (or a leaked old one) wrote."""
    from nomoat.edge.adapters import read_meta

    data = adapter_file.read_bytes()
    meta = read_meta(adapter_file)
    m = {"type": "adapter", "name": name, "version": 1, "base_model_hash": meta["base_model_hash"],
         "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "chunk_size": len(data),
         "chunks": [hashlib.sha256(data).hexdigest()], "created": time.time(), "expires": None,
         "activate": True, "scale": 1.0, **fields}
    m = sign(m, load_key(key_path))
    base = f"nomoat/f/adapters/{name}"
    return m, [(f"{base}/1/0", data), (base, json.dumps(m).encode())]


def test_a_signed_push_named_dotdot_is_refused_and_writes_nothing_outside_the_store(broker, slots, adapter_file,
                                                                                     key, tmp_path):
    key_path, pub = key
    ev = Events(broker)
    store = tmp_path / "deep" / "store"
    d = start_device(broker, slots, "d1", store, pub)
    try:
        _, msgs = forged(key_path, adapter_file, "..")
        publish(broker, msgs)
        assert "is not 1-64 characters" in ev.wait("rejected", "d1")["reason"]
        assert not list((tmp_path / "deep").glob("*.onnx_adapter")) and not list(tmp_path.rglob("1.onnx_adapter"))
        assert wait_status(broker, "d1", "online")["installed"] == {}
    finally:
        d.stop()
        ev.close()
    # the operator's command line refuses it before anything is signed
    from click.testing import CliRunner
    from nomoat.edge.cli import main

    for bad in ("..", "State.json", "a/b", "x" * 65):
        result = CliRunner().invoke(main, ["fleet", "push", str(adapter_file), "--name", bad, "--fleet", "f",
                                           "--broker", broker.url, "--key", str(key_path)])
        assert result.exit_code == 2 and "is not 1-64 characters" in result.output, (bad, result.output)


def test_a_rollback_sticks_against_a_replayed_newer_push(broker, slots, adapter_file, key, tmp_path):
    key_path, pub = key
    with device(broker, slots, tmp_path / "store", pub) as (d, ev):
        push(broker, adapter_file, key_path, version=1)
        ev.wait("activated", "d1")
        v2 = recorded(*push(broker, adapter_file, key_path, version=2))
        ev.wait("activated", "d1")
        control(broker, key_path, "rollback", 1)
        assert ev.wait("rolled_back", "d1")["version"] == 1
        publish(broker, v2)  # the attacker re-publishes the retained v2 manifest and chunks
        assert "not newer" in ev.wait("rejected", "d1")["reason"]
        assert wait_status(broker, "d1", "online")["installed"] == {"a1": 1}
        # the operator can still go forward: a newer rollback order to a stored version, or a new version
        control(broker, key_path, "rollback", 2)
        assert ev.wait("rolled_back", "d1")["version"] == 2


def test_an_old_control_order_cannot_be_replayed(broker, slots, adapter_file, key, tmp_path):
    key_path, pub = key
    with device(broker, slots, tmp_path / "store", pub) as (d, ev):
        push(broker, adapter_file, key_path, version=1)
        ev.wait("activated", "d1")
        push(broker, adapter_file, key_path, version=2)
        ev.wait("activated", "d1")
        order = control(broker, key_path, "rollback", 1)
        ev.wait("rolled_back", "d1")
        push(broker, adapter_file, key_path, version=3)
        ev.wait("activated", "d1")
        publish(broker, order)  # replay "rollback to v1"
        assert "not newer than the last accepted" in ev.wait("rejected", "d1")["reason"]
        assert wait_status(broker, "d1", "online")["installed"] == {"a1": 3}


def test_a_removed_adapter_does_not_come_back_even_after_a_restart(broker, slots, adapter_file, key, tmp_path):
    key_path, pub = key
    ev = Events(broker)
    d = start_device(broker, slots, "d1", tmp_path / "store", pub)
    try:
        v3 = recorded(*push(broker, adapter_file, key_path, version=3))
        ev.wait("activated", "d1")
        control(broker, key_path, "remove", 0)
        ev.wait("removed", "d1")
        publish(broker, v3)
        assert "not newer" in ev.wait("rejected", "d1")["reason"]
        assert ask(broker, "d1", [{"name": "a1"}])["error"]["code"] == "unknown_adapter"
    finally:
        d.stop()
    # the tombstone is on disk: a restarted device refuses the replay too
    d = start_device(broker, slots, "d1", tmp_path / "store", pub)
    try:
        publish(broker, v3)
        assert "not newer" in ev.wait("rejected", "d1")["reason"]
        assert wait_status(broker, "d1", "online")["installed"] == {}
        push(broker, adapter_file, key_path, version=4)  # a new version brings it back
        ev.wait("activated", "d1")
    finally:
        d.stop()
        ev.close()


@pytest.mark.parametrize("fields,topic_name,reason", [
    ({"expires": "tomorrow"}, None, "'expires' must be"),
    ({"size": "big"}, None, "'size' must be"),
    ({"chunks": "x"}, None, "'chunks' must be"),
    ({"version": True}, None, "'version' must be"),
    ({"scale": 1e308 * 10}, None, "'scale' must be"),
    ({}, "state.json", "is not 1-64 characters"),
    ({}, "x" * 300, "is not 1-64 characters"),
])
def test_malformed_signed_manifests_are_rejected_with_a_reason(broker, slots, adapter_file, key, tmp_path, fields,
                                                               topic_name, reason):
    key_path, pub = key
    with device(broker, slots, tmp_path / "store", pub) as (d, ev):
        name = topic_name or "a1"
        m, msgs = forged(key_path, adapter_file, name, **fields)
        publish(broker, msgs)
        e = ev.wait("rejected", "d1")
        assert reason in e["reason"], e
        assert wait_status(broker, "d1", "online")["installed"] == {}
        assert not (tmp_path / "store" / "state.json").is_dir()
        push(broker, adapter_file, key_path, version=2)  # and the device still takes a good push
        ev.wait("activated", "d1")


def test_a_junk_chunk_is_dropped_and_the_real_one_completes_the_push(broker, slots, adapter_file, key, tmp_path):
    key_path, pub = key
    with device(broker, slots, tmp_path / "store", pub) as (d, ev):
        push(broker, adapter_file, key_path, version=1)
        ev.wait("activated", "d1")
        manifest, chunks = push(broker, adapter_file, key_path, version=2, tamper=b"x" * 1024)
        ev.wait("received", "d1")
        time.sleep(1.0)
        assert wait_status(broker, "d1", "online")["installed"] == {"a1": 1}
        assert not [e for e in ev.seen if e["event"] == "rejected"]
        publish(broker, [("nomoat/f/adapters/a1/2/1", chunks[1])])  # the real chunk
        assert ev.wait("activated", "d1")["version"] == 2


def serve(broker, model, device, store, pub, tmp_path):
    log = open(tmp_path / f"serve-{device}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "nomoat", "serve", str(model), "--broker", broker.url,
                             "--fleet", "f", "--device", device, "--trust", pub, "--adapter-store", str(store)],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wait_status(broker, device, "online", timeout=60)
    return proc


def rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_unsigned_junk_neither_fills_memory_nor_blocks_a_real_push(broker, slots, adapter_file, key, tmp_path):
    key_path, pub = key
    proc = serve(broker, slots, "d5", tmp_path / "store", pub, tmp_path)
    try:
        ask(broker, "d5")  # warm: the first generation's buffers are allocated
        before = rss_mib(proc.pid)
        publish(broker, [(f"nomoat/f/adapters/junkram{i}/1/0", os.urandom(1024 * 1024)) for i in range(48)])
        publish(broker, [(f"nomoat/f/adapters/junk{k}/{k % 7}/{k % 5}", b"x") for k in range(300)])
        time.sleep(1.5)
        grown = rss_mib(proc.pid) - before
        assert grown < 16, f"RSS grew {grown:.1f} MiB with 48 MiB of unsigned chunks"
        from click.testing import CliRunner
        from nomoat.edge.cli import main

        result = CliRunner().invoke(main, ["fleet", "push", str(adapter_file), "--name", "mood", "--fleet", "f",
                                           "--broker", broker.url, "--key", str(key_path), "--activate",
                                           "--chunk-size", "2048", "--wait-for", "1", "--timeout", "30"])
        assert result.exit_code == 0 and "activated" in result.output, result.output
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_push_state_written_before_freshness_existed_still_loads(broker, slots, adapter_file, key, tmp_path):
    """A store from an older nomoat (no "orders"): its installed versions count as the highest accepted."""
    key_path, pub = key
    ev = Events(broker)
    d = start_device(broker, slots, "d1", tmp_path / "store", pub)
    try:
        v2 = recorded(*push(broker, adapter_file, key_path, version=2))
        ev.wait("activated", "d1")
    finally:
        d.stop()
    state = json.loads((tmp_path / "store" / "state.json").read_text())
    del state["orders"]
    (tmp_path / "store" / "state.json").write_text(json.dumps(state))
    old = push(broker, adapter_file, key_path, version=1)
    d = start_device(broker, slots, "d1", tmp_path / "store", pub)
    try:
        assert d.default_adapters == (("a1", 1.0),)
        publish(broker, recorded(*old))
        assert "not newer" in ev.wait("rejected", "d1")["reason"]
        publish(broker, v2)  # a replay of what it has is not news
        push(broker, adapter_file, key_path, version=3)
        assert ev.wait("activated", "d1")["version"] == 3
    finally:
        d.stop()
        ev.close()


def test_broker_message_size_limit_for_the_daemon(tmp_path, slots, key):
    """The daemon tells the broker (MQTT 5 Maximum Packet Size) to drop what it would refuse anyway."""
    b = Broker(tmp_path)
    key_path, pub = key
    d = start_device(b, slots, "d1", tmp_path / "store", pub)
    try:
        from test_daemon import Client

        c = Client(b)
        c.send("nomoat/f/d1/prompt", b'{"id": "huge", "prompt": "x", "pad": "' + b"y" * (4 << 20) + b'"}')
        c.send("nomoat/f/d1/prompt", {"id": "small", "prompt": "x", "max_tokens": 2})
        msgs = c.until_done("small")
        assert [m for _, m, _ in msgs if m.get("done")][0]["id"] == "small"  # the 4 MiB one never arrived
        assert d.disconnects == 0
        c.close()
    finally:
        d.stop()
        b.stop()
