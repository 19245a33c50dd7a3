"""The device half of fleet adapter push, plugged into the daemon's MQTT client.

The device subscribes to its fleet's manifests only. A manifest that verifies (signature, every field,
freshness: `AdapterStore.check_fresh`) makes it subscribe to that one version's chunks, which are retained:
the broker sends them then, and again after a restart. So nothing an attacker publishes elsewhere reaches
the device, and a chunk that does not match its signed hash is dropped while the device waits for the real
one. Chunks already verified are kept on disk and not needed twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

from .adapters import AdapterError
from .daemon import Daemon
from .fleet import AdapterStore, PushRejected, parse_manifest

log = logging.getLogger("nomoat.updater")


class AdapterUpdater:
    def __init__(self, daemon: Daemon, store_root: Path):
        self.d = daemon
        self.gen = daemon.gen
        p = daemon.profile
        self.store = AdapterStore(store_root, p.adapter_store_mb * 1024 * 1024)
        self.trusted = p.trusted_keys
        self.base = daemon.topics.adapters
        self.pending: dict[str, dict] = {}  # name -> the verified manifest being downloaded (one per name)
        self.last_push: dict = {}
        self._load_installed()
        daemon.hooks += [(f"{self.base}/+", self.on_manifest), (f"{self.base}/+/+/+", self.on_chunk)]
        daemon.subscriptions.append(f"{self.base}/+")
        daemon.status_extra = self.status

    def _load_installed(self) -> None:
        defaults = []
        for name, entry in self.store.state["adapters"].items():
            try:
                self.gen.load_adapter(self.store.path(name, entry["version"]), name)
            except (AdapterError, PushRejected) as e:
                log.error("installed adapter %s v%s no longer loads: %s", name, entry["version"], e)
                continue
            if entry.get("active"):
                defaults.append((name, entry.get("scale", 1.0)))
        self.d.default_adapters = tuple(defaults)

    def status(self) -> dict:
        return {"installed": {n: e["version"] for n, e in self.store.state["adapters"].items()},
                "last_push": self.last_push}

    def event(self, event: str, name: str, version, **extra) -> None:
        msg = {"event": event, "name": name, "version": version, "device": self.d.topics.device,
               "ts": round(time.time(), 3), **extra}
        if event in ("activated", "installed", "rejected", "removed", "rolled_back"):
            self.last_push = msg
        log.info("adapter %s v%s: %s %s", name, version, event, extra.get("reason", ""))
        self.d._publish(self.d.topics.events, json.dumps(msg).encode())

    # ---- manifests ------------------------------------------------------------------------------
    def on_manifest(self, msg) -> None:
        if not msg.payload:
            return  # a cleared retained manifest
        name = msg.topic.rsplit("/", 1)[1]
        try:
            m = parse_manifest(msg.payload, name, self.trusted)
            if self.store.check_fresh(m):
                {"adapter": self._offer, "rollback": self._rollback, "remove": self._remove}[m["type"]](m)
        except PushRejected as e:
            self.event("rejected", name[:80], _claimed_version(msg.payload), reason=str(e))
        except Exception as e:  # a bug here must still answer the operator, and leave the previous adapter
            log.exception("manifest on %s", msg.topic)
            self.event("rejected", name[:80], _claimed_version(msg.payload), reason=f"internal error: {e}")

    def _offer(self, m: dict) -> None:
        name, version = m["name"], m["version"]
        if m["base_model_hash"] != self.gen.manifest.model_hash:
            raise PushRejected("adapter is for another base model")
        if m["size"] > self.store.cap:
            raise PushRejected(f"adapter is {m['size']} bytes; the store cap is {self.store.cap}")
        current = self.pending.get(name)
        if current and current["signature"] == m["signature"]:
            self._fetch(m)  # seen again after a reconnect: ask for the chunks again
            return
        if current and m["created"] <= current["created"]:
            raise PushRejected(f"version {version} is older than version {current['version']}, being downloaded")
        self._supersede(name, m["created"])
        self.pending[name] = m
        self.event("received", name, version, chunks=len(m["chunks"]), size=m["size"])
        self._try_complete(m)  # chunks kept on disk before a restart
        if name in self.pending:
            self._fetch(m)

    def _chunk_filter(self, m: dict) -> str:
        return f"{self.base}/{m['name']}/{m['version']}/+"

    def _fetch(self, m: dict) -> None:
        self.d.client.subscribe(self._chunk_filter(m), qos=1)  # retained: the broker sends them now

    def _supersede(self, name: str, created: float) -> None:
        """Drop the download of `name` that a newer order replaces."""
        old = self.pending.get(name)
        if old and old["created"] < created:
            self._abandon(old)

    def _abandon(self, m: dict) -> None:
        self.pending.pop(m["name"], None)
        self.d.client.unsubscribe(self._chunk_filter(m))
        self.store.drop_partial(m["name"], m["version"])

    # ---- chunks ---------------------------------------------------------------------------------
    def on_chunk(self, msg) -> None:
        _, name, version, index = msg.topic.rsplit("/", 3)
        try:
            self._take_chunk(name, version, index, msg.payload)
        except PushRejected as e:
            self.event("rejected", name, int(version), reason=str(e))
        except Exception as e:  # as in on_manifest
            log.exception("chunk on %s", msg.topic)
            self.event("rejected", name, int(version), reason=f"internal error: {e}")

    def _take_chunk(self, name: str, version: str, index: str, payload: bytes) -> None:
        m = self.pending.get(name)
        if m is None or version != str(m["version"]) or not index.isdigit() or int(index) >= len(m["chunks"]):
            return  # nothing a verified manifest asked for: not kept
        i = int(index)
        if hashlib.sha256(payload).hexdigest() != m["chunks"][i]:
            log.warning("adapter %s v%s: dropped a chunk %d that does not match its hash; waiting for the real one",
                        name, version, i)
            return
        part = self.store.partial(name, m["version"]) / f"{i}.chunk"
        if not part.exists():
            tmp = part.with_suffix(".tmp")
            tmp.write_bytes(payload)
            tmp.replace(part)  # chunks survive a restart: a resumed push needs only the rest
        self._try_complete(m)

    def _try_complete(self, m: dict) -> None:
        name, version = m["name"], m["version"]
        folder = self.store.partial(name, version)
        parts = [folder / f"{i}.chunk" for i in range(len(m["chunks"]))]
        if not all(p.exists() for p in parts):
            return
        data = b"".join(p.read_bytes() for p in parts)
        self._abandon(m)
        if len(data) != m["size"] or hashlib.sha256(data).hexdigest() != m["sha256"]:
            raise PushRejected("assembled file does not match its sha256")
        self.event("verified", name, version)
        path = self.store.install(name, version, data)
        try:
            self.gen.load_adapter(path, name)  # hot swap: requests in flight keep their bound tensors
        except AdapterError as e:
            path.unlink(missing_ok=True)
            raise PushRejected(str(e)) from None
        self.store.commit(m, {"version": version, "sha256": m["sha256"], "active": m["activate"],
                              "scale": m["scale"]})
        self.event("installed", name, version)
        if m["activate"]:
            self._activate(name, m["scale"])
            self.event("activated", name, version)
        self.store.prune()
        self.d.publish_status()

    def _activate(self, name: str, scale: float) -> None:
        others = tuple((n, s) for n, s in self.d.default_adapters if n != name)
        self.d.default_adapters = others + ((name, scale),)

    # ---- control orders ---------------------------------------------------------------------------
    def _rollback(self, m: dict) -> None:
        name, version = m["name"], m["version"]
        path = self.store.path(name, version)
        if not path.exists():
            raise PushRejected(f"version {version} is not in the adapter store")
        self._supersede(name, m["created"])
        entry = self.store.installed(name) or {"active": False, "scale": 1.0}
        try:
            self.gen.load_adapter(path, name)
        except AdapterError as e:
            raise PushRejected(str(e)) from None
        self.store.commit(m, {**entry, "version": version, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
        if entry.get("active"):
            self._activate(name, entry.get("scale", 1.0))
        self.event("rolled_back", name, version)
        self.d.publish_status()

    def _remove(self, m: dict) -> None:
        name = m["name"]
        self._supersede(name, m["created"])
        if name in self.gen.adapters.adapters:
            self.gen.adapters.remove(name)
        self.d.default_adapters = tuple((n, s) for n, s in self.d.default_adapters if n != name)
        self.store.commit(m, None)  # the order stays: a tombstone that older pushes cannot get past
        shutil.rmtree(self.store.path(name, 0).parent, ignore_errors=True)
        self.store.prune()
        self.event("removed", name, m["version"])
        self.d.publish_status()


def _claimed_version(payload: bytes) -> int | None:
    """The version a rejected manifest says it has, for the operator's `--wait-for` (never trusted)."""
    try:
        v = json.loads(payload).get("version")
    except Exception:  # noqa: BLE001 - any junk: no version
        return None
    return v if isinstance(v, int) and not isinstance(v, bool) and abs(v) < 2**53 else None
