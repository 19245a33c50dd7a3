#!/usr/bin/env python3
"""A mixed MQTT soak: QoS 0 and QoS 1 prompts to one `nomoat serve` for a while, with one broker restart (a third
of the way) and one daemon SIGTERM + restart (two thirds of the way); then how many of each QoS were answered
once, lost, or answered twice.

    .venv/bin/python tools/soak_mqtt.py models/smollm2-135m --seconds 600 --rate 2

A private Mosquitto on loopback with persistence on (as a real deployment has it: the device's queued prompts
and the client's session outlive the broker's restart). The client keeps a persistent session too, and sends
from one paho client that queues QoS 1 messages while the broker is away. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, seconds: float = 10) -> None:
    end = time.time() + seconds
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("mosquitto did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--rate", type=float, default=2.0, help="prompts per second (QoS 0 and 1 alternate)")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--grace", type=float, default=60, help="seconds to wait for answers after the last prompt")
    args = ap.parse_args()

    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    work = Path(tempfile.mkdtemp(prefix="nomoat-soak-"))
    port = free_port()
    conf = work / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                    f"persistence_location {work}/\nautosave_interval 1\nmax_queued_messages 10000\n"
                    + ("user root\n" if os.geteuid() == 0 else ""))
    broker_log = open(work / "mosquitto.log", "a")  # noqa: SIM115

    def start_broker() -> subprocess.Popen:
        p = subprocess.Popen([mosquitto, "-c", str(conf)], stdout=broker_log, stderr=subprocess.STDOUT)
        wait_port(port)
        return p

    serve_log = open(work / "serve.log", "a")  # noqa: SIM115

    def start_daemon() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "nomoat", "serve", args.model, "--broker",
                                 f"mqtt://127.0.0.1:{port}", "--fleet", "soak", "--device", "s1"],
                                stdout=serve_log, stderr=subprocess.STDOUT, cwd=ROOT)

    broker = start_broker()
    daemon = start_daemon()
    inbox: queue.Queue = queue.Queue()
    reply_topic = f"nomoat/soak/clients/{uuid.uuid4().hex}"
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"soak-{uuid.uuid4().hex[:8]}",
                         protocol=mqtt.MQTTv5)
    client.on_connect = lambda c, u, f, r, p: c.subscribe(reply_topic, qos=1)
    client.on_message = lambda c, u, m: inbox.put((json.loads(m.payload), time.time()))
    client.max_queued_messages_set(0)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    client.connect("127.0.0.1", port, clean_start=False, properties=props)
    client.loop_start()
    time.sleep(5)  # the daemon loads and connects

    sent: dict[str, dict] = {}
    finals: dict[str, list] = {}
    notices = {"interrupted": 0}
    events: list[str] = []

    def drain(timeout: float = 0.0) -> None:
        end = time.time() + timeout
        while True:
            try:
                m, t = inbox.get(timeout=max(0.0, end - time.time()) or 0.001)
            except queue.Empty:
                return
            if m.get("interrupted"):
                notices["interrupted"] += 1
            if m.get("done") and m.get("id") in sent:
                finals.setdefault(m["id"], []).append((m, t))

    start = time.time()
    broker_restarted = daemon_restarted = False
    i = 0
    while time.time() - start < args.seconds:
        elapsed = time.time() - start
        if not broker_restarted and elapsed > args.seconds / 3:
            broker.send_signal(signal.SIGTERM)
            broker.wait()
            time.sleep(2)
            broker = start_broker()
            broker_restarted = True
            events.append(f"broker restarted at {elapsed:.0f} s")
        if not daemon_restarted and elapsed > 2 * args.seconds / 3:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=60)
            time.sleep(1)
            daemon = start_daemon()
            daemon_restarted = True
            events.append(f"daemon SIGTERM + restart at {elapsed:.0f} s")
        qos = i % 2
        rid = f"soak{i}"
        p = Properties(PacketTypes.PUBLISH)
        p.ResponseTopic, p.CorrelationData = reply_topic, rid.encode()
        info = client.publish("nomoat/soak/s1/prompt", json.dumps({"id": rid, "prompt": "The capital",
                              "max_tokens": args.max_tokens, "stream": False}), qos=qos, properties=p)
        sent[rid] = {"qos": qos, "t": time.time(), "published": info.rc == mqtt.MQTT_ERR_SUCCESS}
        i += 1
        drain(1.0 / args.rate)
    drain(args.grace)
    client.disconnect()
    client.loop_stop()
    daemon.send_signal(signal.SIGTERM)
    daemon.wait(timeout=60)
    broker.terminate()
    broker.wait()

    report = {"seconds": args.seconds, "rate": args.rate, "events": events, "interrupted_notices": notices["interrupted"]}
    for qos in (0, 1):
        ids = [r for r, s in sent.items() if s["qos"] == qos]
        once = [r for r in ids if len(finals.get(r, [])) == 1]
        codes: dict[str, int] = {}
        for r in once:
            m = finals[r][0][0]
            key = m["error"]["code"] if "error" in m else m["finish_reason"]
            codes[key] = codes.get(key, 0) + 1
        latency = sorted(finals[r][0][1] - sent[r]["t"] for r in once)
        report[f"qos{qos}"] = {
            "sent": len(ids), "answered_once": len(once), "duplicated": sum(len(finals.get(r, [])) > 1 for r in ids),
            "lost": sum(r not in finals for r in ids),
            "lost_unpublished": sum(r not in finals and not sent[r]["published"] for r in ids),
            "finals": codes, "p50_s": round(latency[len(latency) // 2], 3) if latency else None,
            "max_s": round(latency[-1], 3) if latency else None}
    print(json.dumps(report))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
