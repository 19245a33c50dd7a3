"""MQTT sessions: one place for how nomoat connects (MQTT 5, TLS, credentials, reconnect backoff, session
expiry, packet limit), used by the daemon, `nomoat ask` and `nomoat fleet` (which therefore load no
onnxruntime)."""

from __future__ import annotations

import ssl
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from . import protocol as proto
from .profile import MqttSettings


def _file(path: str) -> str | None:
    return str(Path(path).expanduser()) if path else None


def make_client(settings: MqttSettings, client_id: str, persistent: bool, manual_ack: bool = False) -> mqtt.Client:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5,
                         manual_ack=manual_ack)
    broker = proto.parse_broker(settings.broker)
    for what in ("ca_file", "cert_file", "key_file"):  # TLS only when asked: mqtts:// or a ca_file
        if getattr(settings, what) and not Path(getattr(settings, what)).expanduser().is_file():
            raise ValueError(f"[mqtt] {what} {getattr(settings, what)} does not exist")
    if settings.username:
        client.username_pw_set(settings.username, settings.password or None)
    if broker.tls or settings.ca_file:
        client.tls_set(ca_certs=_file(settings.ca_file), certfile=_file(settings.cert_file),
                       keyfile=_file(settings.key_file), cert_reqs=ssl.CERT_REQUIRED)
    client.reconnect_delay_set(min_delay=1, max_delay=30)  # exponential backoff between reconnects
    client.max_queued_messages_set(10000)
    client._nomoat_broker = broker  # noqa: SLF001 (kept for connect())
    client._nomoat_persistent = persistent  # noqa: SLF001
    return client


def connect(client: mqtt.Client, settings: MqttSettings, max_packet: int = 0) -> None:
    """Connect in the background (paho reconnects); `max_packet`: the largest packet the broker may send us."""
    props = Properties(PacketTypes.CONNECT)
    if client._nomoat_persistent:  # noqa: SLF001
        props.SessionExpiryInterval = settings.session_expiry
    if max_packet:
        props.MaximumPacketSize = max_packet
    b = client._nomoat_broker  # noqa: SLF001
    client.connect_async(b.host, b.port, keepalive=settings.keepalive,
                         clean_start=not client._nomoat_persistent, properties=props)  # noqa: SLF001
