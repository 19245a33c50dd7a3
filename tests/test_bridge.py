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
from nomoat.edge.client import ask, collect_raw
from nomoat.edge.daemon import Daemon
from nomoat.edge.generate import Generator
from nomoat.edge.profile import MqttSettings, Profile
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


@pytest.fixture(params=["mqttv311", "mqttv50"])
def bridged(request, tmp_path):
    """The shipped topology (its bridges speak MQTT 3.1.1), and the same with `bridge_protocol_version mqttv50`."""
    overrides = {"bridge_protocol_version": f"bridge_protocol_version {request.param}"}
    t = sites.Topology(2, DEVICES, folder=tmp_path / "brokers", site_overrides=overrides)
    t.protocol = request.param
    t.wait_bridges()
    yield t
    t.close()


def test_prompts_and_answers_cross_the_bridge(bridged, slots):
    """`nomoat ask` on the central broker reaches a device on each site, directly and through the pool. Over the
    shipped MQTT 3.1.1 bridge a request's Response Topic and Correlation Data are dropped and the device answers on
    its fallback topic; over an MQTT 5 bridge they cross both ways."""
    topo = bridged
    central = Central(topo, "nomoat/home/+/status", "nomoat/home/clients/#", "nomoat/home/+/reply/#")
    daemons = [device(topo, "site-a", "dev-a1", slots), device(topo, "site-b", "dev-b1", slots)]
    try:
        for name in ("dev-a1", "dev-b1"):  # each device's retained status crosses its bridge
            central.wait(state_is(name, "online"), earlier=True)
        expected = Generator(slots).generate("The capital", max_tokens=12).text
        settings = topo.operator()
        for name in ("dev-a1", "dev-b1"):
            settings.device = name
            messages = list(ask(settings, {"prompt": "The capital", "max_tokens": 12}, timeout=30))
            assert "".join(m["delta"] for m in messages[:-1]) == messages[-1]["text"] == expected
        pool = list(ask(settings, {"prompt": "The capital", "max_tokens": 12}, pool=True, timeout=30))
        assert pool[-1]["text"] == expected

        inbox = f"nomoat/home/clients/{uuid.uuid4().hex}"
        central.publish("nomoat/home/dev-b1/prompt", {"id": "p1", "prompt": "The capital", "max_tokens": 6},
                        response=inbox, correlation=b"corr-1")
        _, _, props = central.wait(final("p1"))
        replies = [props for t, p, props in central.seen if json.loads(p).get("id") == "p1"]
        assert len(replies) >= 2
        if topo.protocol == "mqttv50":  # on the client's inbox, with its correlation and the device's properties
            assert {t for t, p, _ in central.seen if json.loads(p).get("id") == "p1"} == {inbox}
            for props in replies:
                assert props.CorrelationData == b"corr-1"
                assert props.PayloadFormatIndicator == 1 and props.ContentType == "application/json"
        else:  # on the fallback topic, without properties
            assert {t for t, p, _ in central.seen if json.loads(p).get("id") == "p1"} == {"nomoat/home/dev-b1/reply/p1"}
            assert all(getattr(props, "CorrelationData", None) is None for props in replies)
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
        # the next push clears v1's retained chunks on the central broker, and the bridges carry that to the sites
        out = CliRunner().invoke(cli, ["fleet", "--config", str(config), "push", str(adapter_file), "--name", "a1",
                                       "--key", str(key_path), "--version", "2", "--chunk-size", "1024",
                                       "--wait-for", "3", "--timeout", "30"])
        assert out.exit_code == 0 and "cleared the" in out.output, out.output
        for site, user in (("site-a", "dev-a1"), ("site-b", "dev-b1")):  # (a device's user may read adapters/#)
            settings = MqttSettings(broker=topo.sites[site].url, fleet="home", username=user, password=PASSWORD)
            held = collect_raw(settings, "nomoat/home/adapters/#", 1.0)
            assert held and not [t for t in held if "/a1/1/" in t] and all(p for p in held.values()), held.keys()
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
        central.wait(lambda t, p: t == "nomoat/home/dev-a1/availability" and p == b"online", earlier=True)
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
            """(id, device) -> how many answers, once every id has one or after `seconds`."""
            end = time.time() + seconds
            while True:
                by: dict[tuple[str, str], int] = {}
                for t, p, _ in central.seen:
                    if "/reply/" in t and json.loads(p).get("id") in ids:
                        key = (json.loads(p)["id"], t.split("/")[2])
                        by[key] = by.get(key, 0) + 1
                if set(ids) <= {rid for rid, _ in by} or time.time() > end:
                    return by
                central.drain(0.2)

        ids = [f"pool-{i}" for i in range(12)]
        send(ids)
        by = answered(ids, 20)
        central.drain(1)  # (a duplicate would come now)
        by = answered(ids, 0)
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
        lost = sorted(set(ids) - {rid for rid, _ in answered(ids, 5)})
        assert lost  # what Mosquitto does; docs/deployment.md says so
        for _ in range(6):  # ... and a client's retry with the same id gets another turn
            send(lost)
            lost = sorted(set(lost) - {rid for rid, _ in answered(lost, 3)})
            if not lost:
                break
        assert not lost
    finally:
        for d in daemons.values():
            d.stop()
        central.close()


def test_a_prompt_for_a_cut_off_site_waits_on_the_central_broker_and_is_answered_when_the_link_is_back(bridged,
                                                                                                     slots):
    """The site's device bridge keeps its session on the central broker (cleansession false): a QoS 1 prompt
    published while the link is down is queued there, not lost. Not over Mosquitto 2.0's MQTT 5 bridge: it sends no
    Session Expiry Interval, so its session ends with the link and the prompt is dropped (why the shipped bridge
    speaks 3.1.1)."""
    topo = bridged
    central = Central(topo, "nomoat/home/+/reply/#", "nomoat/home/+/status", "nomoat/home/sites/+/bridge")
    d = device(topo, "site-b", "dev-b1", slots)
    try:
        central.wait(state_is("dev-b1", "online"))
        topo.relays["site-b"].cut()
        central.wait(lambda t, p: t == "nomoat/home/sites/site-b/bridge" and p == b"0")
        central.publish("nomoat/home/dev-b1/prompt", {"id": "while-cut", "prompt": "The capital", "max_tokens": 4,
                                                      "stream": False})
        assert not [p for t, p, _ in central.drain(3) if "/reply/" in t]
        topo.relays["site-b"].restore()
        topo.wait_bridges()
        if topo.protocol == "mqttv50":
            assert not [p for t, p, _ in central.drain(5) if "/reply/" in t]
            return
        _, payload, _ = central.wait(final("while-cut"), timeout=60)
        assert json.loads(payload)["text"]
    finally:
        d.stop()
        central.close()


def test_the_many_devices_harness_on_four_daemons(tmp_path):
    """tools/fleet_scale.py at N = 4 (the README's figures come from N = 10 … 100): every device activates the
    push and every pool prompt is answered exactly once."""
    scale = load_tool("fleet_scale")
    model, adapter, key, pub = scale.build_model(tmp_path / "model")
    r = scale.run(4, 2, model, adapter, key, pub, prompts=2)
    assert r["online"] == 4 and r["push"]["activated"] == 4 and r["push"]["chunks"] == 29
    assert r["pool"]["answered"] == 8 and r["pool"]["lost"] == 0 and r["pool"]["twice"] == 0
    assert sum(r["pool"]["per_site"].values()) == 8 and all(r["pool"]["per_site"].values())


def test_a_pool_per_site_through_a_bridge_topic_mapping(tmp_path, slots):
    """docs/deployment.md's alternative to the fleet-wide pool: each site's pool bridge maps
    nomoat/home/pools/SITE/prompt on the central broker to the site's own pool topic, so a client picks the site
    and the site's devices share its prompts."""
    mapping = {"topic $share/": "topic prompt in 1 nomoat/home/ nomoat/home/pools/site-a/"}
    topo = sites.Topology(2, DEVICES, folder=tmp_path / "brokers", site_overrides=mapping)
    daemons = []
    try:
        topo.wait_bridges()
        central = Central(topo, "nomoat/home/+/reply/#", "nomoat/home/+/status")
        daemons = [device(topo, s, n, slots) for s, n in (("site-a", "dev-a1"), ("site-a", "dev-a2"),
                                                            ("site-b", "dev-b1"))]
        for d in ("dev-a1", "dev-a2", "dev-b1"):
            central.wait(state_is(d, "online"), earlier=True)
        for site, expected in (("site-a", {"dev-a1", "dev-a2"}), ("site-b", {"dev-b1"})):
            ids = [f"{site}-{i}" for i in range(6)]
            for rid in ids:
                central.publish(f"nomoat/home/pools/{site}/prompt", {"id": rid, "prompt": "The capital",
                                                                     "max_tokens": 4, "stream": False})
            for rid in ids:
                central.wait(final(rid), earlier=True)
            central.drain(1)
            by = [(json.loads(p)["id"], t.split("/")[2]) for t, p, _ in central.seen if "/reply/" in t
                  and json.loads(p).get("id") in ids]
            assert sorted(rid for rid, _ in by) == ids and {dev for _, dev in by} == expected, by
        central.close()
    finally:
        for d in daemons:
            d.stop()
        topo.close()


def test_the_shipped_tls_lines_carry_the_bridge(tmp_path, slots):
    """The central broker's TLS listener and the site bridge's bridge_cafile as shipped (other tests drop them),
    with a CA and a server certificate made as a user makes them: the bridge verifies the central broker, and an
    operator reaches a site's device over mqtts://."""
    from test_field import make_certificates

    certs = tmp_path / "certs"
    certs.mkdir()
    make_certificates(certs)
    topo = sites.Topology(1, {"site-a": ["dev-a1"]}, folder=tmp_path / "brokers", tls=certs)
    d = None
    try:
        topo.wait_bridges()
        assert "certfile" in topo.central.conf.read_text() and "bridge_cafile" in topo.sites["site-a"].conf.read_text()
        d = device(topo, "site-a", "dev-a1", slots)
        settings = topo.operator()
        settings.device = "dev-a1"
        answer = list(ask(settings, {"prompt": "The capital", "max_tokens": 6}, timeout=30))[-1]
        assert answer["done"] and answer["text"] == Generator(slots).generate("The capital", max_tokens=6).text
    finally:
        if d:
            d.stop()
        topo.close()

