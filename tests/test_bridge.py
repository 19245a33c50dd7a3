"""A fleet over bridged brokers, with the configs shipped in tools/mosquitto/bridge/ (run by tools/bridged_sites.py):
a central Mosquitto with the shipped ACL and two site Mosquittos bridged to it, each through a relay that can be
cut; devices on the sites (their own users, the site's nomoat.acl), the operator and clients on the central
broker."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import time
import uuid

import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner
from conftest import load_tool, mosquitto_path
from nomoat.edge.cli import main as cli
from nomoat.edge.client import ask
from nomoat.edge.daemon import Daemon
from nomoat.edge.generate import Generator
from nomoat.edge.profile import Profile
from nomoat.edge.updater import AdapterUpdater
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

pytestmark = [pytest.mark.mqtt,
              pytest.mark.skipif(not mosquitto_path() or not shutil.which("mosquitto_passwd"),
                                 reason="mosquitto (with mosquitto_passwd) is not installed")]

sites = load_tool("bridged_sites")
PASSWORD = sites.PASSWORD
DEVICES = {"site-a": ["dev-a1", "dev-a2"], "site-b": ["dev-b1"]}


@pytest.fixture
def topo(tmp_path):
    t = sites.Topology(2, DEVICES, folder=tmp_path / "brokers")
    t.wait_bridges()
    yield t
    t.close()


def device(topo, site: str, name: str, model, pub: str | None = None, store=None) -> Daemon:
    p = Profile(queue_size=8, max_new_tokens=64)
    s = p.mqtt
    s.broker, s.fleet, s.device, s.username, s.password, s.session_expiry = (
        topo.sites[site].url, sites.FLEET, name, name, PASSWORD, 600)
    if pub:
        p.trusted_keys = [pub]
    d = Daemon(Generator(model), p)
    if store is not None:
        AdapterUpdater(d, store)
    d.start()
    return d


class Central:
    """An operator's client on the central broker that keeps every message under some filters."""

    def __init__(self, topo, *filters: str):
        self.inbox: queue.Queue = queue.Queue()
        self.seen: list[tuple[str, bytes, Properties | None]] = []
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.c.username_pw_set("operator", PASSWORD)
        self.c.on_message = lambda c, u, m: self.inbox.put((m.topic, m.payload, getattr(m, "properties", None)))
        subscribed: queue.Queue = queue.Queue()
        self.c.on_subscribe = lambda *a: subscribed.put(1)
        self.c.connect("127.0.0.1", topo.central.port)
        self.c.loop_start()
        self.c.subscribe([(f, 1) for f in filters])
        subscribed.get(timeout=5)

    def wait(self, match, timeout: float = 30.0, earlier: bool = False):
        """The first message (topic, payload, properties) for which match(topic, payload) holds, among those
        that arrive from now on (`earlier`: or have arrived)."""
        for item in self.seen if earlier else ():
            if match(item[0], item[1]):
                return item
        end = time.time() + timeout
        while time.time() < end:
            try:
                item = self.inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            self.seen.append(item)
            if match(item[0], item[1]):
                return item
        raise AssertionError(f"no such message within {timeout} s; saw {[(t, p[:80]) for t, p, _ in self.seen][-20:]}")

    def drain(self, seconds: float) -> list:
        end, got = time.time() + seconds, []
        while time.time() < end:
            try:
                got.append(self.inbox.get(timeout=0.1))
            except queue.Empty:
                pass
        self.seen += got
        return got

    def publish(self, topic: str, payload: dict, response: str | None = None, correlation: bytes | None = None):
        props = Properties(PacketTypes.PUBLISH)
        if response:
            props.ResponseTopic = response
        if correlation:
            props.CorrelationData = correlation
        self.c.publish(topic, json.dumps(payload), qos=1, properties=props).wait_for_publish(5)

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


def state_is(device: str, state: str):
    return lambda topic, payload: topic == f"nomoat/home/{device}/status" and payload and \
        json.loads(payload).get("state") == state


def final(rid: str):
    return lambda topic, payload: payload.startswith(b"{") and json.loads(payload).get("id") == rid and \
        json.loads(payload).get("done")


def operator_config(topo, tmp_path):
    path = tmp_path / "operator.toml"
    path.write_text(f'[mqtt]\nbroker = "{topo.central.url}"\nfleet = "home"\nusername = "operator"\n'
                    f'password = "{PASSWORD}"\n')
    return path


def test_prompts_and_answers_cross_the_bridge_with_their_mqtt5_properties(topo, slots):
    central = Central(topo, "nomoat/home/+/status", "nomoat/home/clients/#", "nomoat/home/+/reply/#")
    daemons = [device(topo, "site-a", "dev-a1", slots), device(topo, "site-b", "dev-b1", slots)]
    try:
        for name in ("dev-a1", "dev-b1"):  # each device's retained status crosses its bridge
            central.wait(state_is(name, "online"))
        expected = Generator(slots).generate("The capital", max_tokens=12).text
        for name in ("dev-a1", "dev-b1"):  # `nomoat ask` on the central broker, MQTT 5 request/response
            settings = topo.operator()
            settings.device = name
            messages = list(ask(settings, {"prompt": "The capital", "max_tokens": 12}, timeout=30))
            assert "".join(m["delta"] for m in messages[:-1]) == messages[-1]["text"] == expected
        # Response Topic and Correlation Data go in, and come back on every reply with the device's own properties
        inbox = f"nomoat/home/clients/{uuid.uuid4().hex}"
        central.publish("nomoat/home/dev-b1/prompt", {"id": "p1", "prompt": "The capital", "max_tokens": 6},
                        response=inbox, correlation=b"corr-1")
        central.wait(lambda t, p: t == inbox and json.loads(p).get("done"))
        replies = [(p, props) for t, p, props in central.seen if t == inbox]
        assert len(replies) >= 2
        for _, props in replies:
            assert props.CorrelationData == b"corr-1"
            assert props.PayloadFormatIndicator == 1 and props.ContentType == "application/json"
    finally:
        for d in daemons:
            d.stop()
        central.close()


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_home_assistant_style_mqtt311_clients_on_the_central_broker(topo, slots, qos):
    """mosquitto_pub/mosquitto_sub (MQTT 3.1.1, no properties) on the central broker, the device on a site: the
    answer comes back on the fallback topic."""
    d = device(topo, "site-b", "dev-b1", slots)
    try:
        rid = f"ha-{qos}"
        auth = ["-h", "127.0.0.1", "-p", str(topo.central.port), "-u", "operator", "-P", PASSWORD, "-V", "311"]
        sub = subprocess.Popen(["mosquitto_sub", *auth, "-q", "1", "-C", "1", "-W", "30", "-t",
                                f"nomoat/home/dev-b1/reply/{rid}"], stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)
        subprocess.run(["mosquitto_pub", *auth, "-q", str(qos), "-t", "nomoat/home/dev-b1/prompt", "-m",
                        json.dumps({"id": rid, "prompt": "The capital", "max_tokens": 6, "stream": False})],
                       check=True, timeout=20)
        out, _ = sub.communicate(timeout=40)
        answer = json.loads(out)
        assert answer["done"] and answer["finish_reason"] in ("stop", "length") and answer["text"]
    finally:
        d.stop()


def test_a_mqtt311_bridge_drops_the_properties_and_nomoat_ask_gets_the_fallback(tmp_path, slots):
    """Bridges to brokers or over links that speak MQTT 3.1.1 only: the device sees no Response Topic and answers
    on reply/{id}; `nomoat ask` listens there too (it waited for ever before)."""
    t = sites.Topology(1, {"site-a": ["dev-a1"]}, folder=tmp_path / "brokers",
                       site_overrides={"bridge_protocol_version": "bridge_protocol_version mqttv311"})
    try:
        t.wait_bridges()
        d = device(t, "site-a", "dev-a1", slots)
        settings = t.operator()
        settings.device = "dev-a1"
        messages = list(ask(settings, {"prompt": "The capital", "max_tokens": 8}, timeout=20))
        assert messages[-1]["done"] and messages[-1]["text"] == Generator(slots).generate(
            "The capital", max_tokens=8).text
        pool = list(ask(settings, {"prompt": "The capital", "max_tokens": 8}, pool=True, timeout=20))
        assert pool[-1]["text"] == messages[-1]["text"]
        d.stop()
    finally:
        t.close()


def test_a_fleet_push_reaches_every_device_on_both_sites_offline_ones_and_a_cut_site_included(
        topo, slots, adapter_file, key, tmp_path):
    key_path, pub = key
    central = Central(topo, "nomoat/home/+/events", "nomoat/home/+/status", "nomoat/home/sites/+/bridge")
    a1 = device(topo, "site-a", "dev-a1", slots, pub, tmp_path / "store-a1")
    a2 = device(topo, "site-a", "dev-a2", slots, pub, tmp_path / "store-a2")
    b1 = device(topo, "site-b", "dev-b1", slots, pub, tmp_path / "store-b1")
    daemons = [a1, b1]
    try:
        for name in ("dev-a1", "dev-a2", "dev-b1"):
            central.wait(state_is(name, "online"))
        base = Generator(slots).generate("The capital", max_tokens=12).text
        a2.stop()  # offline during the push (its site's broker keeps its session)
        central.wait(state_is("dev-a2", "offline"))
        topo.relays["site-b"].cut()  # site b's uplink is down during the push
        central.wait(lambda t, p: t == "nomoat/home/sites/site-b/bridge" and p == b"0")
        config = operator_config(topo, tmp_path)
        out = CliRunner().invoke(cli, ["fleet", "--config", str(config), "push", str(adapter_file), "--name", "a1",
                                       "--key", str(key_path), "--activate", "--chunk-size", "1024",
                                       "--wait-for", "1", "--timeout", "30"])
        assert out.exit_code == 0, out.output
        assert "dev-a1" in out.output and "activated" in out.output

        def activated(name):
            return lambda t, p: t == f"nomoat/home/{name}/events" and json.loads(p)["event"] == "activated" \
                and json.loads(p)["name"] == "a1"

        a2 = device(topo, "site-a", "dev-a2", slots, pub, tmp_path / "store-a2")  # back online: takes the push
        daemons.append(a2)
        central.wait(activated("dev-a2"))
        topo.relays["site-b"].restore()  # the link is back: retained manifest and chunks cross it
        central.wait(activated("dev-b1"), timeout=60)
        answers = set()
        for name in ("dev-a1", "dev-a2", "dev-b1"):
            settings = topo.operator()
            settings.device = name
            answers.add(list(ask(settings, {"prompt": "The capital", "max_tokens": 12}, timeout=30))[-1]["text"])
        assert len(answers) == 1 and answers != {base}  # one adapted answer everywhere
        status = CliRunner().invoke(cli, ["fleet", "--config", str(config), "status"])
        assert status.exit_code == 0
        lines = {line.split()[0]: line for line in status.output.splitlines()[1:] if line.strip()}
        for name in ("dev-a1", "dev-a2", "dev-b1"):
            assert "a1@v1" in lines[name], status.output
        assert "site-a" in status.output and "site-b" in status.output  # the bridges' state, from their notices
    finally:
        for d in daemons:
            d.stop()
        central.close()


def test_status_and_last_will_are_visible_centrally(topo, slots, tmp_path):
    """A device killed with SIGKILL: its site broker publishes the Last Wills, which cross the bridge retained. A
    site cut off: the central broker shows the bridge's own Last Will (its devices' statuses there are the last
    ones it got)."""
    central = Central(topo, "nomoat/home/+/status", "nomoat/home/+/availability", "nomoat/home/sites/+/bridge")
    proc = subprocess.Popen([sys.executable, "-m", "nomoat", "serve", str(slots), "--config",
                             str(topo.device_config("site-a", "dev-a1"))], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        central.wait(state_is("dev-a1", "online"), timeout=60)
        central.wait(lambda t, p: t == "nomoat/home/dev-a1/availability" and p == b"online")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        central.wait(state_is("dev-a1", "offline"))  # the two Last Wills, in either order
        central.wait(lambda t, p: t == "nomoat/home/dev-a1/availability" and p == b"offline", earlier=True)
        topo.relays["site-b"].cut()
        central.wait(lambda t, p: t == "nomoat/home/sites/site-b/bridge" and p == b"0")
        assert topo.bridge_states() == {"site-a": "1", "site-b": "0"}  # retained: a late operator sees it too
    finally:
        if proc.poll() is None:
            proc.kill()
        central.close()


def test_the_fleet_pool_spans_the_sites_each_prompt_answered_once(topo, slots):
    """Pool prompts published on the central broker: the sites' pool bridges share one subscription there (one
    site per prompt), then the site's devices share theirs (one device). A site whose link is down leaves the group
    at once; a site whose devices are all gone drops its share, which the client's retry (same id) recovers."""
    central = Central(topo, "nomoat/home/+/reply/#", "nomoat/home/+/status")
    daemons = {n: device(topo, s, n, slots) for s, n in (("site-a", "dev-a1"), ("site-a", "dev-a2"),
                                                          ("site-b", "dev-b1"))}
    try:
        for name in daemons:
            central.wait(state_is(name, "online"))

        def send(ids):
            for rid in ids:  # no Response Topic: the fallback topic tells which device answered
                central.publish("nomoat/home/prompt", {"id": rid, "prompt": "The capital", "max_tokens": 4,
                                                       "stream": False})

        def answered(ids, seconds):
            end, by = time.time() + seconds, {}
            while time.time() < end and not set(ids) <= {rid for rid, _ in by}:
                central.drain(0.2)
            for t, p, _ in central.seen:
                if "/reply/" in t and json.loads(p).get("id") in ids:
                    by[(json.loads(p)["id"], t.split("/")[2])] = by.get((json.loads(p)["id"], t.split("/")[2]), 0) + 1
            return by

        ids = [f"pool-{i}" for i in range(12)]
        send(ids)
        time.sleep(3)
        by = answered(ids, 20)
        assert sorted(rid for rid, _ in by) == sorted(ids) and set(by.values()) == {1}  # once each, no duplicate
        devices = {dev for _, dev in by}
        assert "dev-b1" in devices and devices & {"dev-a1", "dev-a2"}  # both sites served

        topo.relays["site-b"].cut()  # site b's link down: its pool bridge leaves the group at once
        time.sleep(1)
        ids = [f"cut-{i}" for i in range(6)]
        send(ids)
        by = answered(ids, 20)
        assert sorted(rid for rid, _ in by) == sorted(ids) and {dev for _, dev in by} <= {"dev-a1", "dev-a2"}
        topo.relays["site-b"].restore()
        topo.wait_bridges()

        daemons.pop("dev-b1").stop()  # site b up, but no device there: its share is dropped at the site ...
        ids = [f"empty-{i}" for i in range(6)]
        send(ids)
        time.sleep(3)
        lost = sorted(set(ids) - {rid for rid, _ in answered(ids, 10)})
        assert lost  # what Mosquitto does; docs/deployment.md says so
        for _ in range(6):  # ... and a client's retry with the same id gets another turn
            send(lost)
            lost = sorted(set(lost) - {rid for rid, _ in answered(lost, 5)})
            if not lost:
                break
        assert not lost
    finally:
        for d in daemons.values():
            d.stop()
        central.close()
