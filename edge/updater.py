"""The device half of fleet adapter push, plugged into the daemon's MQTT client.

The device subscribes to its fleet's manifests only. A manifest that verifies (signature, every field,
freshness: `AdapterStore.check_fresh`) makes it subscribe to that one version's chunks, which are retained:
the broker sends them then, and again after a restart. So nothing an attacker publishes elsewhere reaches
the device, and a chunk that does not match its signed hash is dropped while the device waits for the real
one. Chunks already verified are kept on disk and not needed twice.

Threads: manifests and chunks are checked on paho's network thread (nothing there touches the model); what
changes the device's state — installing, activating, rolling back, removing — runs on the daemon's worker
between two requests (`Daemon.on_worker`), which checks freshness again first: the worker alone owns the
Generator and its adapters, and a request always runs with one adapter set from its first token to its last.
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
        installed = list(self.store.state["adapters"].items())  # (one step: the worker may change it meanwhile)
        return {"installed": {n: e["version"] for n, e in installed},
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
            if not self.store.check_fresh(m):
                return
            if m["type"] == "adapter":
                self._offer(m)
            else:
                self._supersede(m["name"], m["created"])
                self.d.on_worker(lambda: self._change(m, self._rollback if m["type"] == "rollback" else self._remove))
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

    def _stop_fetching(self, m: dict) -> None:
        self.pending.pop(m["name"], None)
        self.d.client.unsubscribe(self._chunk_filter(m))

    def _abandon(self, m: dict) -> None:
        self._stop_fetching(m)
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
        folder = self.store.partial(m["name"], m["version"])
        if all((folder / f"{i}.chunk").exists() for i in range(len(m["chunks"]))):
            self._stop_fetching(m)
            self.d.on_worker(lambda: self._change(m, self._install))

    # ---- on the worker ------------------------------------------------------------------------------
    def _change(self, m: dict, change) -> None:
        """Make a state change for the accepted order `m`, if it is still the newest (an order accepted while
        this one waited for the worker may have made it stale)."""
        try:
            if self.store.check_fresh(m):
                change(m)
        except PushRejected as e:
            self.event("rejected", m["name"], m["version"], reason=str(e))
        except Exception as e:  # as in on_manifest
            log.exception("adapter %s v%s", m["name"], m["version"])
            self.event("rejected", m["name"], m["version"], reason=f"internal error: {e}")
        finally:
            if m["type"] == "adapter":
                self.store.drop_partial(m["name"], m["version"])

    def _install(self, m: dict) -> None:
        name, version = m["name"], m["version"]
        folder = self.store.partial(name, version, create=False)
        data = b"".join((folder / f"{i}.chunk").read_bytes() for i in range(len(m["chunks"])))
        if len(data) != m["size"] or hashlib.sha256(data).hexdigest() != m["sha256"]:
            raise PushRejected("assembled file does not match its sha256")
        self.event("verified", name, version)
        path = self.store.install(name, version, data)
        try:
            self.gen.load_adapter(path, name)  # between requests: the next one binds it
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
