"""`nomoat ask`: send one prompt over MQTT and stream the answer (MQTT 5 request/response)."""

from __future__ import annotations

import json
import queue
import uuid
from collections.abc import Iterator

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .fleet import MAX_VERSION
from .profile import MqttSettings
from .protocol import Topics
from .session import connect, make_client

CONNECT_TIMEOUT = 15.0  # seconds an operator's command waits for the broker


def _unreachable(settings: MqttSettings) -> str:
    return (f"cannot reach the broker at {settings.broker} within {CONNECT_TIMEOUT:.0f} s (is it running, and the URL "
            f"right?)")


def ask(settings: MqttSettings, request: dict, pool: bool = False, timeout: float = 120.0) -> Iterator[dict]:
    """Yield the reply messages (chunks, then the final one) for one request."""
    request = {"id": uuid.uuid4().hex[:16], **request}
    topics = Topics(settings.prefix, settings.fleet, settings.device or "-")
    reply_topic = f"{settings.prefix}/{settings.fleet}/clients/{uuid.uuid4().hex}"
    correlation = request["id"].encode()
    # Where a broker or bridge drops MQTT 5 properties (a mqttv311 bridge, an MQTT 3.1.1 broker), the device
    # answers on its fallback topic instead: listen there too, matching by id.
    fallback = Topics(settings.prefix, settings.fleet, "+" if pool else topics.device).reply(request["id"])
    inbox: queue.Queue = queue.Queue()
    client = make_client(settings, f"nomoat-ask-{uuid.uuid4().hex[:8]}", persistent=False)

    def on_connect(c, userdata, flags, reason, properties):
        if reason.is_failure:
            inbox.put(ConnectionError(f"the broker {settings.broker} refused the connection: {reason}"))
            return
        inbox.put("connected")
        c.subscribe([(reply_topic, 1), (fallback, 1)])

    def on_subscribe(c, userdata, mid, reasons, properties):
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = reply_topic
        props.CorrelationData = correlation
        c.publish(topics.pool if pool else topics.prompt, json.dumps(request), qos=1, properties=props)

    def on_message(c, userdata, msg):
        try:
            message = json.loads(msg.payload)
        except ValueError:
            return
        if not isinstance(message, dict):
            return
        # by correlation, or by id (a bridge may have dropped the properties on the way, in or out)
        if getattr(msg.properties, "CorrelationData", None) == correlation or message.get("id") == request["id"]:
            inbox.put(message)

    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    connect(client, settings)
    client.loop_start()
    try:
        try:
            first = inbox.get(timeout=min(timeout, 10.0))
        except queue.Empty:
            raise ConnectionError(f"cannot reach the broker at {settings.broker} (is Mosquitto running there?)") from None
        if isinstance(first, Exception):
            raise first
        to = f"the fleet {settings.fleet!r}'s pool" if pool else f"device {settings.device!r} of fleet {settings.fleet!r}"
        while True:
            try:
                message = inbox.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"the broker took the prompt, but {to} sent no answer within {timeout:.0f}s: is "
                                   f"`nomoat serve` running there? (`nomoat fleet status --fleet {settings.fleet}` "
                                   f"lists the devices)") from None
            yield message
            if message.get("done"):
                return
    finally:
        client.disconnect()
        client.loop_stop()


def publish_all(settings: MqttSettings, messages: list[tuple[str, bytes]], retain: bool = True,
                timeout: float = 60.0) -> None:
    """Publish messages at QoS 1 and return once the broker has acknowledged every one."""
    client = make_client(settings, f"nomoat-op-{uuid.uuid4().hex[:8]}", persistent=False)
    connected = queue.Queue()
    client.on_connect = lambda c, u, f, reason, p: connected.put(reason)
    connect(client, settings)
    client.loop_start()
    try:
        try:
            reason = connected.get(timeout=min(timeout, CONNECT_TIMEOUT))
        except queue.Empty:
            raise ConnectionError(_unreachable(settings)) from None
        if reason.is_failure:
            raise ConnectionError(f"broker refused the connection: {reason}")
        _publish_acknowledged(client, messages, retain, timeout)
    finally:
        client.disconnect()
        client.loop_stop()


def _publish_acknowledged(client, messages: list[tuple[str, bytes]], retain: bool, timeout: float) -> None:
    infos = [client.publish(topic, payload, qos=1, retain=retain) for topic, payload in messages]
    for info in infos:
        info.wait_for_publish(timeout)


def push_and_watch(settings: MqttSettings, messages: list[tuple[str, bytes]], name: str, version: int,
                   devices: int, until: str = "installed", timeout: float = 300.0) -> list[dict]:
    """Publish a push, then wait until `devices` devices have reported `until` (or rejected) for it.

    Returns those events with `seconds`: the time from the first publish to the event's arrival.
    """
    import time

    client = make_client(settings, f"nomoat-op-{uuid.uuid4().hex[:8]}", persistent=False)
    inbox: queue.Queue = queue.Queue()
    events = Topics(settings.prefix, settings.fleet, "+").events  # every device's events
    client.on_connect = lambda c, u, f, r, p: c.subscribe(events, qos=1)
    client.on_subscribe = lambda c, u, mid, reasons, p: inbox.put("subscribed")

    def on_message(c, u, msg):
        try:
            inbox.put(json.loads(msg.payload))
        except ValueError:
            pass

    client.on_message = on_message
    connect(client, settings)
    client.loop_start()
    results: dict[str, dict] = {}
    try:
        try:
            if inbox.get(timeout=CONNECT_TIMEOUT) != "subscribed":
                raise ConnectionError("could not subscribe to the fleet's events")
        except queue.Empty:
            raise ConnectionError(_unreachable(settings)) from None
        start = time.perf_counter()
        _publish_acknowledged(client, messages, True, timeout)
        while len(results) < devices:
            left = start + timeout - time.perf_counter()
            try:
                event = inbox.get(timeout=max(left, 0.01))
            except queue.Empty:
                break
            if (isinstance(event, dict) and event.get("name") == name and event.get("version") == version
                    and event.get("event") in (until, "rejected")):
                results[event.get("device", "?")] = {**event, "seconds": round(time.perf_counter() - start, 3)}
    finally:
        client.disconnect()
        client.loop_stop()
    return sorted(results.values(), key=lambda e: e["seconds"])


def collect_raw(settings: MqttSettings, topic: str | list[str], seconds: float = 2.0) -> dict[str, bytes]:
    """Retained payloads under a topic filter (or several), by topic, as the broker holds them."""
    import time

    filters = [topic] if isinstance(topic, str) else topic
    client = make_client(settings, f"nomoat-op-{uuid.uuid4().hex[:8]}", persistent=False)
    found: dict[str, bytes] = {}
    subscribed: queue.Queue = queue.Queue()

    def on_connect(c, u, f, reason, p):
        if reason.is_failure:
            subscribed.put(ConnectionError(f"the broker {settings.broker} refused the connection: {reason}"))
        else:
            c.subscribe([(t, 1) for t in filters])

    client.on_connect = on_connect
    client.on_subscribe = lambda c, u, mid, reasons, p: subscribed.put("subscribed")

    def on_message(c, u, msg):
        if msg.payload:
            found[msg.topic] = msg.payload
        else:  # an empty message clears a retained one (someone did so while we listened)
            found.pop(msg.topic, None)

    client.on_message = on_message
    connect(client, settings)
    client.loop_start()
    try:
        try:
            ready = subscribed.get(timeout=CONNECT_TIMEOUT)
        except queue.Empty:
            raise ConnectionError(_unreachable(settings)) from None
        if isinstance(ready, Exception):
            raise ready
        time.sleep(seconds)  # retained messages come right after the subscription
    finally:
        client.disconnect()
        client.loop_stop()
    return found


def json_objects(found: dict[str, bytes]) -> dict[str, dict]:
    """The payloads that are JSON objects. Anything else is skipped: anyone on the broker may have published it."""
    objects = {}
    for topic, payload in found.items():
        try:
            value = json.loads(payload)
        except ValueError:
            continue
        if isinstance(value, dict):
            objects[topic] = value
    return objects


def collect_retained(settings: MqttSettings, topic: str | list[str], seconds: float = 2.0) -> dict[str, dict]:
    """Retained JSON objects under a topic filter (or several), by topic."""
    return json_objects(collect_raw(settings, topic, seconds))


def next_version(settings: MqttSettings, name: str, seconds: float = 2.0) -> int:
    """One above every version of adapter `name` the broker still shows: the retained manifest's and each
    device's retained status (installed, last push). Devices refuse a push not above the highest they installed."""
    topics = Topics(settings.prefix, settings.fleet, "+")
    found = collect_retained(settings, [topics.adapter(name), topics.status], seconds)
    versions = [0]
    for msg in found.values():
        installed, last = msg.get("installed"), msg.get("last_push")
        versions += [msg.get("version") if msg.get("name") == name else None,
                     installed.get(name) if isinstance(installed, dict) else None,
                     last.get("version") if isinstance(last, dict) and last.get("name") == name else None]
    # anyone on the broker can publish a retained status: only versions a device would accept count
    return max(v for v in versions if type(v) is int and 0 <= v < MAX_VERSION - 1) + 1
