"""`nomoat serve`: the device daemon. Prompts in over MQTT, streamed answers out.

Threads: paho's network loop (callbacks: parse, validate, enqueue, cancel) and one worker
that generates (the CPU is the bottleneck, so one request at a time). Requests are QoS 1 and
acknowledged only when answered (manual ack), with a persistent session: a daemon that dies
mid-request gets the prompt again from the broker, and prompts sent while it was offline are
delivered when it comes back. A repeat of a request (same id, same content) gets its final message, marked
`repeat`; another request under a used id gets `duplicate_id`.

No message may kill a thread or go unanswered: every callback and the worker catch per message, answer
with an error code where the message named a way to answer, log once and move on, and acknowledge it (a
message that cannot be handled is dropped, not redelivered forever).
"""

from __future__ import annotations

import json
import logging
import queue
import signal
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from . import __version__
from . import protocol as proto
from .fleet import MAX_CHUNK, MAX_MANIFEST
from .generate import GenerationError, Generator
from .profile import Profile
from .session import connect, make_client

log = logging.getLogger("nomoat.daemon")


def _response_topic(msg: mqtt.MQTTMessage, topics: proto.Topics) -> str | None:
    """The request's MQTT 5 Response Topic if it may be used (`protocol.check_response_topic`), else None."""
    topic = getattr(getattr(msg, "properties", None), "ResponseTopic", None)
    return topic if topic is not None and proto.check_response_topic(topic, topics) is None else None


Receipt = tuple[mqtt.Client, int | None, int]  # (the connection a message came in on, its id, its QoS)


@dataclass
class Job:
    request: proto.Request
    reply_topic: str
    correlation: bytes | None
    receipt: Receipt  # what to acknowledge once answered
    cancelled: bool = False
    repeats: list[tuple[str, bytes | None]] = field(default_factory=list)  # (reply topic, correlation) of repeats

    @property
    def qos(self) -> int:
        return self.receipt[2]


class Daemon:
    def __init__(self, generator: Generator, profile: Profile, log_json: bool = False):
        self.gen, self.profile, self.log_json = generator, profile, log_json
        s = profile.mqtt
        if not s.device:
            raise ValueError("a device name is required (--device or [mqtt] device in the profile)")
        self.topics = proto.Topics(s.prefix, s.fleet, s.device)
        # The worker's inbox: prompts (Job) and device-state changes (adapter installs, activations, removals as
        # callables), in arrival order. The worker alone owns the Generator and the default adapters; MQTT callbacks
        # only parse, check and enqueue.
        self.queue: queue.Queue[Job | Callable[[], None]] = queue.Queue()
        self.waiting = 0  # prompts in the queue (at most queue_size)
        self.current: Job | None = None
        self.jobs: dict[str, Job] = {}  # queued or running, by id
        self.done: OrderedDict[str, tuple[str, bytes]] = OrderedDict()  # id -> (content, final message), recent
        self.lock = threading.Lock()
        self.started = time.time()
        self.instance = uuid.uuid4().hex[:12]  # tells this process's status from another's with the same name
        self.last_disconnect = 0.0
        p = profile  # what a client may ask (docs/protocol.md has the value ranges)
        self.limits = {"max_new_tokens": p.max_new_tokens, "max_prompt_chars": p.max_prompt_chars,
                       "max_payload_bytes": p.max_payload_bytes, "queue_size": p.queue_size,
                       "max_packet_bytes": max(p.max_payload_bytes, MAX_CHUNK, MAX_MANIFEST) + 64 * 1024}
        self.last_tok_s = 0.0
        self.default_adapters: tuple[tuple[str, float], ...] = ()
        self.stopping = threading.Event()
        self.client = make_client(s, f"nomoat-{s.fleet}-{s.device}", persistent=True, manual_ack=True)
        self.client.will_set(self.topics.status, self._status("offline"), qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        # The fleet pool on a connection of its own without a persistent session: when the device dies, the broker
        # drops its share of `$share/{fleet}/…/prompt` and hands the pool's prompts to the devices still alive
        # (a persistent session would keep receiving them for its whole expiry). Its Last Will is the plain
        # availability topic (Home Assistant's `availability_topic`).
        self.pool_client = make_client(s, f"nomoat-{s.fleet}-{s.device}-pool", persistent=False, manual_ack=True)
        self.pool_client.will_set(self.topics.availability, b"offline", qos=1, retain=True)
        self.pool_client.on_connect = self._on_pool_connect
        self.pool_client.on_message = self._on_message
        self.hooks: list = []  # extra (topic filter, handler) pairs, e.g. the fleet adapter updater
        self.subscriptions: list[str] = []  # extra topic filters to subscribe to on every connect
        self.disconnects = 0
        self.fatal = ""  # why the daemon must stop on its own (another process took its session over)
        self.halted = threading.Event()

    # ---- MQTT callbacks (paho's network thread) -----------------------------------------------
    def _on_connect(self, client, userdata, flags, reason, properties):
        if reason.is_failure:
            log.error("broker refused the connection: %s", reason)
            return
        log.info("connected to %s (session present: %s)", self.profile.mqtt.broker, flags.session_present)
        opts = SubscribeOptions(qos=1)
        subs = [(self.topics.prompt, opts), (self.topics.cancel, opts)]
        subs.append((self.topics.status, opts))  # another process as this device? (`_on_status`)
        subs += [(topic, opts) for topic in self.subscriptions]
        client.subscribe(subs)
        client.unsubscribe(self.topics.pool_shared)  # a session of an older nomoat had the pool here
        self.publish_status()

    def _on_pool_connect(self, client, userdata, flags, reason, properties):
        if reason.is_failure:
            log.error("broker refused the pool connection: %s", reason)
            return
        client.subscribe(self.topics.pool_shared, qos=1)
        client.publish(self.topics.availability, b"online", qos=1, retain=True)

    def _on_disconnect(self, client, userdata, flags, reason, properties):
        self.disconnects += 1
        self.last_disconnect = time.time()
        if getattr(reason, "value", None) == 0x8E:  # Session taken over (EMQX, HiveMQ say so; Mosquitto just closes)
            self._taken_over("the broker says another client connected with this client id")
            return
        if not self.stopping.is_set():
            log.warning("disconnected from broker (%s); reconnecting", reason)

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage):
        receipt = (client, msg.mid, msg.qos)  # acknowledged on the connection it came in on
        try:
            if msg.topic == self.topics.cancel:
                self._cancel(msg.payload)
            elif msg.topic == self.topics.status:
                self._on_status(msg.payload)
            elif msg.topic in (self.topics.prompt, self.topics.pool):
                self._submit(msg, receipt)
                return  # acknowledged when answered
            else:
                for topic, handler in self.hooks:
                    if mqtt.topic_matches_sub(topic, msg.topic):
                        handler(msg)
        except Exception as e:  # a bug must not take the network loop down, nor leave a prompt unanswered
            log.exception("error handling a message on %s", msg.topic)
            if msg.topic in (self.topics.prompt, self.topics.pool):
                self._reject(proto.sniff_id(msg.payload), "internal", str(e), _response_topic(msg, self.topics),
                             getattr(getattr(msg, "properties", None), "CorrelationData", None), receipt)
                return
        self._ack(receipt)

    def _taken_over(self, evidence: str) -> None:
        s = self.profile.mqtt
        self.fatal = (f"another process serves as fleet {s.fleet!r}, device {s.device!r} ({evidence}): this one "
                      f"stops, since both would take the broker session from each other for ever; give each its own "
                      f"--device")
        log.error(self.fatal)
        self.client.disconnect()  # no reconnect
        self.pool_client.disconnect()
        self.halted.set()

    def _on_status(self, payload: bytes) -> None:
        """A status on our own topic from another instance. The newer process keeps the name: an older one that
        lost its connection since the newer one started stops (the broker closed it for the newer one's session);
        otherwise the status is a stale one (a crashed run's, its Last Will), and ours is published again."""
        try:
            other = json.loads(payload)
            instance, started, state = other["instance"], float(other["started"]), other["state"]
        except (ValueError, KeyError, TypeError, RecursionError):
            return
        if instance == self.instance or self.fatal:
            return
        if state in ("online", "busy") and started > self.started and self.last_disconnect >= started - 5:
            self._taken_over(f"its status says instance {instance} started at {started:.0f}")
        else:
            self.publish_status()

    @staticmethod
    def _ack(receipt: Receipt) -> None:
        client, mid, qos = receipt
        if mid is not None and qos > 0:  # QoS 0 has nothing to acknowledge (a PUBACK for it is a protocol error)
            client.ack(mid, qos)

    def _submit(self, msg: mqtt.MQTTMessage, receipt: Receipt) -> None:
        p = self.profile
        response = _response_topic(msg, self.topics)
        correlation = getattr(getattr(msg, "properties", None), "CorrelationData", None)
        try:
            req = proto.parse_request(msg.payload, p.max_payload_bytes, p.max_prompt_chars, p.max_new_tokens)
        except proto.RequestError as e:
            self._reject(e.request_id, e.code, e.message, response, correlation, receipt)
            return
        asked = getattr(getattr(msg, "properties", None), "ResponseTopic", None)
        if asked is not None and response is None:  # refused: answered on the fallback topic, saying why
            why = proto.check_response_topic(asked, self.topics)
            self._reject(req.id, "invalid_request", f"Response Topic {asked[:200]!r} refused: {why}", None,
                         correlation, receipt)
            return
        reply = response or self.topics.reply(req.id)
        with self.lock:
            running, done = self.jobs.get(req.id), self.done.get(req.id)
            known = running.request.content if running else done[0] if done else None
            if known is not None and known != req.content:
                self._reject(req.id, "duplicate_id", f"id {req.id!r} is in use by another request on this device",
                             response, correlation, receipt)
                return
            if running:  # a repeat (a client's retry, or the broker's redelivery): one more place for the final
                if (reply, correlation) != (running.reply_topic, running.correlation) and \
                        (reply, correlation) not in running.repeats:
                    running.repeats.append((reply, correlation))
                self._ack(receipt)
                return
            if done:  # already answered: the answer again
                self._publish(reply, proto.repeated(done[1]), correlation)
                self._ack(receipt)
                return
            job = Job(req, reply, correlation, receipt)
            if self.stopping.is_set():  # arrived while shutting down: handed back like the queued ones
                self._hand_back(job, started=False)
                return
            if self.waiting >= p.queue_size:
                self._reject(req.id, "busy", f"queue full ({p.queue_size} waiting); retry later", response,
                             correlation, receipt)
                return
            self.waiting += 1
            self.queue.put(job)
            self.jobs[req.id] = job
        self.publish_status()

    def _reject(self, rid, code, message, response, correlation, receipt: Receipt) -> None:
        if response or rid:
            self._publish(response or self.topics.reply(rid), proto.error(rid, code, message), correlation)
        self._log(rid, event="rejected", code=code, message=message, replied=bool(response or rid))
        self._ack(receipt)

    def _cancel(self, payload: bytes) -> None:
        try:
            rid = json.loads(payload)["id"]
            if not isinstance(rid, str):
                raise TypeError
        except (ValueError, KeyError, TypeError, IndexError, RecursionError):
            log.warning("ignored a malformed cancel message")
            return
        with self.lock:
            job = self.jobs.get(rid)
            if job:
                job.cancelled = True

    # ---- publishing ------------------------------------------------------------------------
    def _publish(self, topic: str, payload: bytes, correlation: bytes | None = None, qos: int = 1,
                 retain: bool = False) -> None:
        props = Properties(PacketTypes.PUBLISH)
        props.PayloadFormatIndicator, props.ContentType = 1, "application/json"  # every payload is UTF-8 JSON
        if correlation is not None:
            props.CorrelationData = correlation
        try:
            self.client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        except (ValueError, TypeError) as e:  # topics are checked before; never let a reply kill a thread
            log.error("could not publish to %r: %s", topic[:200], e)

    def _status(self, state: str) -> bytes:
        m = self.gen.manifest
        return json.dumps({
            "state": state, "device": self.topics.device, "fleet": self.topics.fleet,
            "model": m.name, "model_hash": m.model_hash, "version": __version__,
            "context_length": self.gen.model.max_length, "kv_cache": self.gen.model.kv_dtype,
            "draft_model": self.gen.drafter.name if self.gen.drafter else None,
            "protocol": proto.PROTOCOL_VERSION, "adapters": sorted(self.gen.adapters.adapters),
            "default_adapters": [{"name": n, "scale": s} for n, s in self.default_adapters],
            "queue": self.waiting, "uptime_s": round(time.time() - self.started, 1),
            "last_tok_s": self.last_tok_s, "ts": round(time.time(), 3), "instance": self.instance,
            "started": round(self.started, 3), "limits": self.limits, **self.status_extra(),
        }).encode()

    def status_extra(self) -> dict:
        return {}

    def publish_status(self, state: str | None = None) -> None:
        state = state or ("busy" if self.current or self.waiting else "online")
        self._publish(self.topics.status, self._status(state), retain=True)

    def _log(self, rid, **fields) -> None:
        if self.log_json:
            log.info(json.dumps({"id": rid, **fields}))
        else:
            log.info("request %s %s", rid, " ".join(f"{k}={v}" for k, v in fields.items()))

    # ---- the worker --------------------------------------------------------------------------
    def on_worker(self, task: Callable[[], None]) -> None:
        """Run `task` on the worker, between two requests (device-state changes: the worker owns that state)."""
        self.queue.put(task)

    def _work(self) -> None:
        while not self.stopping.is_set():
            try:
                item = self.queue.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                if isinstance(item, Job):
                    with self.lock:
                        self.waiting -= 1
                    self._run(item)
                else:
                    item()
            except Exception:  # a bug in the bookkeeping or a task: log it, and keep the worker alive
                log.exception("worker item %s", getattr(getattr(item, "request", None), "id", item))

    def _run(self, job: Job) -> None:
        self.current = job
        self.publish_status()
        try:
            payload = self._answer(job)
        except Exception as e:  # never leave a request hanging
            log.exception("request %s failed", job.request.id)
            payload = proto.error(job.request.id, "internal", str(e))
        if payload is None:  # interrupted by a shutdown: handed back, not answered
            with self.lock:
                self.jobs.pop(job.request.id, None)
                self.current = None
            self._hand_back(job, started=True)
            return
        with self.lock:
            self.done[job.request.id] = (job.request.content, payload)
            while len(self.done) > 256:
                self.done.popitem(last=False)
            self.jobs.pop(job.request.id, None)
            self.current = None
        self._publish(job.reply_topic, payload, job.correlation)
        for topic, correlation in job.repeats:
            self._publish(topic, proto.repeated(payload), correlation)
        self._ack(job.receipt)
        self.publish_status()

    def _hand_back(self, job: Job, started: bool) -> None:
        """A request the daemon stops without answering. QoS 1/2 to this device: not acknowledged, so the broker
        delivers it again when the device is back (a stream then starts again at seq 0; the notice says so).
        QoS 0 and pool requests cannot come back (the pool's session ends with the process): `unavailable`."""
        rid = job.request.id
        if job.qos == 0 or job.receipt[0] is self.pool_client:  # the pool's session ends with the process
            self._publish(job.reply_topic, proto.error(rid, "unavailable", "the device shut down before it "
                                                       "answered; send the request again"), job.correlation)
        elif started:
            self._publish(job.reply_topic, json.dumps({"id": rid, "interrupted": "shutdown"}).encode(),
                          job.correlation)
        self._log(rid, event="handed_back", qos=job.qos)

    def _answer(self, job: Job) -> bytes | None:
        """The final message, or None when a shutdown interrupted the request."""
        req = job.request
        if req.deadline is not None and time.time() > req.deadline:
            self._log(req.id, event="expired")
            return proto.error(req.id, "deadline_exceeded", "the request's deadline passed before it started")
        if job.cancelled:
            return proto.final(req.id, "", "cancelled", {"prompt_tokens": 0, "completion_tokens": 0,
                                                          "total_tokens": 0}, {})
        adapters = req.adapters or self.default_adapters
        why = ""  # what stopped the generation early: cancelled, shutdown, deadline

        def stop_now() -> bool:
            nonlocal why
            why = "cancelled" if job.cancelled else "shutdown" if self.stopping.is_set() else \
                "deadline" if req.deadline is not None and time.time() > req.deadline else ""
            return bool(why)

        seq = 0
        try:
            for piece in self.gen.stream(req.prompt, max_tokens=req.max_tokens, params=req.params, stop=req.stop,
                                         adapters=adapters, cancelled=stop_now):
                if isinstance(piece, str):
                    if req.stream:
                        self._publish(job.reply_topic, proto.chunk(req.id, seq, piece), job.correlation)
                        seq += 1
                else:
                    result = piece
        except GenerationError as e:
            self._log(req.id, event="error", code=e.code, message=str(e))
            return proto.error(req.id, e.code, str(e))
        if why == "shutdown" and result.finish_reason == "cancelled":
            return None
        finish = "deadline" if why == "deadline" and result.finish_reason == "cancelled" else result.finish_reason
        self.last_tok_s = result.timings.get("decode_tok_s", 0.0)
        self._log(req.id, prompt_tokens=result.prompt_tokens, tokens=len(result.tokens),
                  tok_s=self.last_tok_s, finish=finish)
        return proto.final(req.id, result.text, finish, result.usage, result.timings)

    # ---- life cycle ----------------------------------------------------------------------------
    def start(self) -> None:
        connect(self.client, self.profile.mqtt, self.limits["max_packet_bytes"])
        self.client.loop_start()
        connect(self.pool_client, self.profile.mqtt, self.limits["max_packet_bytes"])
        self.pool_client.loop_start()
        self.worker = threading.Thread(target=self._work, name="nomoat-worker", daemon=True)
        self.worker.start()

    def stop(self) -> None:
        """Leave the pool, hand the current and queued requests back (`_hand_back`), publish offline, disconnect."""
        self.stopping.set()
        if not self.fatal:
            self._wait(self.pool_client.publish(self.topics.availability, b"offline", qos=1, retain=True))
        self.pool_client.disconnect()
        self.pool_client.loop_stop()
        if hasattr(self, "worker"):
            self.worker.join(timeout=30)
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Job):  # (state changes not made yet come back: their manifests are retained)
                self._hand_back(item, started=False)
        if not self.fatal:  # taken over: the status is the other process's now
            self._wait(self.client.publish(self.topics.status, self._status("offline"), qos=1, retain=True))
        self.client.disconnect()
        self.client.loop_stop()

    @staticmethod
    def _wait(info: mqtt.MQTTMessageInfo) -> None:
        try:
            info.wait_for_publish(timeout=5)
        except (RuntimeError, ValueError):
            pass

    def serve_forever(self) -> None:
        """Serve until SIGTERM/SIGINT; RuntimeError when the daemon had to stop on its own (`fatal`)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.halted.set())
        self.start()
        self.halted.wait()
        log.info("shutting down")
        self.stop()
        if self.fatal:
            raise RuntimeError(self.fatal)
