"""The device half of fleet adapter push, plugged into the daemon's MQTT client.

Manifest and chunks are retained, so a device that was offline (or restarted mid-push) receives
them again on subscribe; chunks already verified are kept on disk and not needed twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from .adapters import AdapterError
from .daemon import Daemon
from .fleet import AdapterStore, PushRejected, verify_signature

log = logging.getLogger("nomoat.updater")
MAX_BUFFERED_CHUNKS = 256


class AdapterUpdater:
    def __init__(self, daemon: Daemon, store_root: Path):
        self.d = daemon
        self.gen = daemon.gen
        p = daemon.profile
        self.store = AdapterStore(store_root, p.adapter_store_mb * 1024 * 1024)
        self.trusted = p.trusted_keys
        t = daemon.topics
        self.base = f"{t.prefix}/{t.fleet}/adapters"
        self.pending: dict[tuple[str, int], dict] = {}
        self.early: dict[tuple[str, int, int], bytes] = {}  # chunks that came before their manifest
        self.last_push: dict = {}
        self._load_installed()
        daemon.hooks += [(f"{self.base}/+", self.on_manifest), (f"{self.base}/+/+/+", self.on_chunk)]
        daemon.status_extra = self.status

    def _load_installed(self) -> None:
        defaults = []
        for name, entry in self.store.state["adapters"].items():
            try:
                self.gen.load_adapter(self.store.path(name, entry["version"]), name)
            except AdapterError as e:
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
            m = json.loads(msg.payload)
            if not isinstance(m, dict):
                raise ValueError("not an object")
        except ValueError:
            self.event("rejected", name, None, reason="manifest is not JSON")
            return
        version = m.get("version")
        try:
            verify_signature(m, self.trusted)
            if m.get("name") != name or not isinstance(version, int):
                raise PushRejected("manifest name/version do not match its topic")
            if m.get("expires") and time.time() > m["expires"]:
                raise PushRejected("manifest expired")
            kind = m.get("type")
            if kind == "remove":
                return self._remove(name, version)
            if kind == "rollback":
                return self._rollback(name, version)
            if kind != "adapter":
                raise PushRejected(f"unknown manifest type {kind!r}")
            installed = self.store.installed(name)
            if installed and installed["version"] == version and installed.get("sha256") == m.get("sha256"):
                return  # the retained manifest of what we already have
            if m.get("base_model_hash") != self.gen.manifest.model_hash:
                raise PushRejected("adapter is for another base model")
            if installed and version <= installed["version"]:
                raise PushRejected(f"version {version} is not newer than installed {installed['version']}")
            if m.get("size", 0) > self.store.cap or len(m.get("chunks", [])) * m.get("chunk_size", 0) < m.get("size", 0):
                raise PushRejected("adapter size is inconsistent or above the store cap")
        except PushRejected as e:
            self.event("rejected", name, version, reason=str(e))
            return
        self.pending[(name, version)] = m
        self.event("received", name, version, chunks=len(m["chunks"]), size=m["size"])
        for key in [k for k in self.early if k[:2] == (name, version)]:
            self._store_chunk(m, key[2], self.early.pop(key))
        self._try_complete(name, version)

    # ---- chunks ---------------------------------------------------------------------------------
    def on_chunk(self, msg) -> None:
        try:
            _, name, version, index = msg.topic.rsplit("/", 3)
            version, index = int(version), int(index)
        except ValueError:
            return
        m = self.pending.get((name, version))
        if m is None:
            installed = self.store.installed(name)
            if (not installed or version > installed["version"]) and len(self.early) < MAX_BUFFERED_CHUNKS:
                self.early[(name, version, index)] = msg.payload
            return
        if self._store_chunk(m, index, msg.payload):
            self._try_complete(name, version)

    def _store_chunk(self, m: dict, index: int, data: bytes) -> bool:
        name, version = m["name"], m["version"]
        if not 0 <= index < len(m["chunks"]):
            return False
        if hashlib.sha256(data).hexdigest() != m["chunks"][index]:
            self.pending.pop((name, version), None)
            self.event("rejected", name, version, reason=f"chunk {index} does not match its hash")
            return False
        part = self.store.partial(name, version) / f"{index}.chunk"
        if not part.exists():
            tmp = part.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.replace(part)  # chunks survive a restart: a resumed push needs only the rest
        return True

    def _try_complete(self, name: str, version: int) -> None:
        m = self.pending.get((name, version))
        if m is None:
            return
        folder = self.store.partial(name, version)
        parts = [folder / f"{i}.chunk" for i in range(len(m["chunks"]))]
        if not all(p.exists() for p in parts):
            return
        data = b"".join(p.read_bytes() for p in parts)
        self.pending.pop((name, version), None)
        if len(data) != m["size"] or hashlib.sha256(data).hexdigest() != m["sha256"]:
            self.event("rejected", name, version, reason="assembled file does not match its sha256")
            return
        self.event("verified", name, version)
        path = self.store.install(name, version, data)
        try:
            self.gen.load_adapter(path, name)  # hot swap: requests in flight keep their bound tensors
        except AdapterError as e:
            path.unlink(missing_ok=True)
            self.event("rejected", name, version, reason=str(e))
            return
        self.store.set_state(name, {"version": version, "sha256": m["sha256"], "active": bool(m.get("activate")),
                                    "scale": m.get("scale", 1.0)})
        self.event("installed", name, version)
        if m.get("activate"):
            self._activate(name, m.get("scale", 1.0))
            self.event("activated", name, version)
        self.store.prune()
        self.d.publish_status()

    def _activate(self, name: str, scale: float) -> None:
        others = tuple((n, s) for n, s in self.d.default_adapters if n != name)
        self.d.default_adapters = others + ((name, scale),)

    def _rollback(self, name: str, version: int) -> None:
        path = self.store.path(name, version)
        if not path.exists():
            self.event("rejected", name, version, reason=f"version {version} is not in the adapter store")
            return
        installed = self.store.installed(name) or {}
        if installed.get("version") == version:
            return
        self.gen.load_adapter(path, name)
        self.store.set_state(name, {**installed, "version": version,
                                    "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
        self.event("rolled_back", name, version)
        self.d.publish_status()

    def _remove(self, name: str, version: int) -> None:
        if not self.store.installed(name):
            return
        self.gen.adapters.remove(name)
        self.d.default_adapters = tuple((n, s) for n, s in self.d.default_adapters if n != name)
        self.store.set_state(name, None)
        self.store.prune()
        self.event("removed", name, version)
        self.d.publish_status()
