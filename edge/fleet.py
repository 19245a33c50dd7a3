"""Fleet adapter push: signed manifests and chunks over MQTT, verified and hot-swapped on devices.

Wire format (docs/protocol.md, "Adapter push"):
  {prefix}/{fleet}/adapters/{name}                      retained signed manifest (JSON)
  {prefix}/{fleet}/adapters/{name}/{version}/{index}    retained raw chunk (<= chunk_size bytes)
  {prefix}/{fleet}/{device}/events                      device events: received, verified, installed,
                                                        activated, rejected (with reason)
The manifest is signed with Ed25519 over its canonical JSON (sorted keys, no spaces) without the
"signature" field. Devices trust only the public keys pinned in their profile.

Threat model (TUF's): an attacker may publish anything on the broker, replay any message ever seen, but
holds no signing key. So a device checks every field of a manifest before it acts on it, keeps per adapter
name the newest order it accepted and the highest version it ever installed (`AdapterStore`), and refuses
anything not newer: old pushes, old rollbacks and pushes of removed adapters cannot be replayed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

log = logging.getLogger("nomoat.fleet")
DEFAULT_CHUNK = 128 * 1024
MAX_CHUNK = 1024 * 1024  # bigger chunks are refused (operator and device): the device's MQTT packet limit
MAX_MANIFEST = 512 * 1024  # 2048+ chunk hashes; a larger manifest is refused before it is parsed
MAX_VERSION = 2**53  # versions are below it (JSON numbers stay exact in every client)
# Adapter names are topic levels and folder names: lowercase so that case-insensitive file systems (Android's
# shared storage) cannot alias two names, no dots (no "..", no "state.json", no hidden folders).
NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
NAME_RULE = "1-64 characters of a-z, 0-9, '_' and '-', starting with a letter or digit"


class PushRejected(Exception):
    pass


def check_name(name: object) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise PushRejected(f"adapter name {str(name)[:80]!r} is not {NAME_RULE}")
    return name


# ---- keys and signatures ------------------------------------------------------------------------
def generate_key(path: Path) -> str:
    """Write a private key (PEM) to `path` and return the public key (hex) to pin on devices."""
    key = Ed25519PrivateKey.generate()
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    os.chmod(path, 0o600)
    return public_hex(key)


def load_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key


def public_hex(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def _canonical(manifest: dict) -> bytes:
    return json.dumps({k: v for k, v in manifest.items() if k != "signature"}, sort_keys=True,
                      separators=(",", ":")).encode()


def sign(manifest: dict, key: Ed25519PrivateKey) -> dict:
    signed = {**manifest, "key": public_hex(key)}
    signed["signature"] = key.sign(_canonical(signed)).hex()
    return signed


def _parse_pub(text: str) -> bytes:
    text = text.strip()
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = base64.b64decode(text)
    if len(raw) != 32:
        raise ValueError(f"not an Ed25519 public key: {text[:16]}…")
    return raw


def verify_signature(manifest: dict, trusted: list[str]) -> None:
    key_hex, sig = manifest.get("key"), manifest.get("signature")
    if not isinstance(key_hex, str) or not isinstance(sig, str):
        raise PushRejected("unsigned manifest")
    if key_hex not in {_parse_pub(k).hex() for k in trusted}:
        raise PushRejected(f"signed by an unknown key {key_hex[:16]}…")
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(key_hex)).verify(bytes.fromhex(sig), _canonical(manifest))
    except (InvalidSignature, ValueError):
        raise PushRejected("bad signature") from None


def _need(m: dict, key: str, kinds, check=lambda v: True, rule: str = "") -> None:
    value = m.get(key)
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    # bool is an int to Python; a float field also takes whole numbers (JSON has one number type)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if ok and isinstance(value, float) and not math.isfinite(value):
        ok = False
    if not ok or not check(value):
        raise PushRejected(f"manifest field {key!r} must be {rule or ' or '.join(k.__name__ for k in kinds)}")


def _is_hex(value: str, size: int = 64) -> bool:
    return len(value) == size and all(c in "0123456789abcdef" for c in value)


def check_manifest(m: dict) -> None:
    """Every field a device acts on has its type and range (after the signature: a trusted key signed it,
    but a device does not crash or misbehave on what a buggy or older operator tool wrote)."""
    _need(m, "type", str, lambda v: v in ("adapter", "rollback", "remove"), "adapter, rollback or remove")
    check_name(m.get("name"))
    _need(m, "created", (int, float), lambda v: v > 0, "a positive unix time")
    _need(m, "version", int, lambda v: 0 <= v < MAX_VERSION, "an integer 0 ... 2^53")
    if m["type"] != "adapter":
        return
    _need(m, "version", int, lambda v: v >= 1, "an integer >= 1")
    _need(m, "base_model_hash", str, lambda v: 0 < len(v) <= 128, "a model hash")
    _need(m, "size", int, lambda v: v >= 0)
    _need(m, "sha256", str, _is_hex, "64 hex digits")
    _need(m, "chunk_size", int, lambda v: 1 <= v <= MAX_CHUNK, f"an integer 1 ... {MAX_CHUNK}")
    _need(m, "chunks", list, lambda v: all(isinstance(h, str) and _is_hex(h) for h in v), "a list of sha256 hex")
    if len(m["chunks"]) != max(1, -(-m["size"] // m["chunk_size"])):
        raise PushRejected("manifest's chunk count does not match its size and chunk_size")
    if m.get("expires") is not None:
        _need(m, "expires", (int, float), rule="a unix time or null")
    _need(m, "activate", bool)
    _need(m, "scale", (int, float), lambda v: abs(v) <= 100, "a number within [-100, 100]")


def parse_manifest(payload: bytes, topic_name: str, trusted: list[str]) -> dict:
    """The signed, well-formed manifest for the adapter name of its topic, or PushRejected saying why."""
    check_name(topic_name)
    if len(payload) > MAX_MANIFEST:
        raise PushRejected(f"manifest is {len(payload)} bytes; the limit is {MAX_MANIFEST}")
    try:
        m = json.loads(payload)
    except (ValueError, RecursionError):
        raise PushRejected("manifest is not JSON") from None
    if not isinstance(m, dict):
        raise PushRejected("manifest is not a JSON object")
    verify_signature(m, trusted)
    check_manifest(m)
    if m["name"] != topic_name:
        raise PushRejected(f"manifest is for {m['name']!r}, published on the topic of {topic_name!r}")
    if m.get("expires") is not None and time.time() > m["expires"]:
        raise PushRejected("manifest expired")
    return m


# ---- operator side ----------------------------------------------------------------------------------
def build_push(adapter_file: Path, name: str, version: int, base_model_hash: str, key: Ed25519PrivateKey,
               chunk_size: int = DEFAULT_CHUNK, activate: bool = False, scale: float = 1.0,
               expires: float | None = None) -> tuple[dict, list[bytes]]:
    check_name(name)
    if not 1 <= chunk_size <= MAX_CHUNK:
        raise ValueError(f"chunk size must be within 1 ... {MAX_CHUNK} bytes")
    data = Path(adapter_file).read_bytes()
    chunks = [data[i:i + chunk_size] for i in range(0, len(data), chunk_size)] or [b""]
    manifest = {
        "type": "adapter", "name": name, "version": int(version), "base_model_hash": base_model_hash,
        "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "chunk_size": chunk_size,
        "chunks": [hashlib.sha256(c).hexdigest() for c in chunks], "created": time.time(),
        "expires": expires, "activate": activate, "scale": scale,
    }
    return sign(manifest, key), chunks


def control_manifest(action: str, name: str, version: int, key: Ed25519PrivateKey) -> dict:
    """A signed rollback (to a stored version) or remove order."""
    check_name(name)
    return sign({"type": action, "name": name, "version": int(version), "created": time.time()}, key)


# ---- device side -------------------------------------------------------------------------------------
class AdapterStore:
    """Installed adapters on disk: {root}/{name}/{version}.onnx_adapter, state in {root}/state.json.

    The state holds what is installed ("adapters": name -> version, sha256, active, scale) and what was
    accepted ("orders": name -> the newest signed order's `created` and signature, the highest version ever
    installed; a removed adapter keeps its entry, a tombstone). Every write is temp file + fsync + rename, so a
    power cut leaves the previous state intact.
    """

    def __init__(self, root: Path, cap_bytes: int):
        self.root, self.cap = Path(root).resolve(), cap_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self.state_file = self.root / "state.json"
        self.state = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}
        self.state.setdefault("adapters", {})
        orders = self.state.setdefault("orders", {})
        for name, entry in self.state["adapters"].items():  # a state file written before "orders" existed
            orders.setdefault(name, {"created": 0.0, "signature": "", "highest": entry["version"]})

    def installed(self, name: str) -> dict | None:
        return self.state["adapters"].get(name)

    def highest(self, name: str) -> int:
        return self.state["orders"].get(name, {}).get("highest", 0)

    def check_fresh(self, m: dict) -> bool:
        """False for the order this device accepted last (a retained manifest seen again); PushRejected for
        anything older (a replay) or, for a push, a version not above every version ever installed."""
        last = self.state["orders"].get(m["name"])
        if last is None:
            return True
        if m["signature"] == last["signature"]:
            return False
        if m["created"] <= last["created"]:
            raise PushRejected(f"order created at {m['created']:.3f} is not newer than the last accepted one "
                               f"({last['created']:.3f}): a replay?")
        if m["type"] == "adapter" and m["version"] <= last["highest"]:
            raise PushRejected(f"version {m['version']} is not newer than {last['highest']}, the highest "
                               f"this device installed (versions only go up; a rollback order goes back)")
        return True

    def _inside(self, path: Path) -> Path:
        """`path` itself, if it resolves inside the store (names are checked too: this is the last line)."""
        if not path.resolve().is_relative_to(self.root):
            raise PushRejected(f"{path} is outside the adapter store")
        return path

    def path(self, name: str, version: int) -> Path:
        return self._inside(self.root / check_name(name) / f"{int(version)}.onnx_adapter")

    def partial(self, name: str, version: int, create: bool = True) -> Path:
        p = self._inside(self.root / ".partial" / f"{check_name(name)}-{int(version)}")
        if create:
            p.mkdir(parents=True, exist_ok=True)
        return p

    def install(self, name: str, version: int, data: bytes) -> Path:
        target = self.path(name, version)
        target.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(target, data)
        return target

    def commit(self, m: dict, entry: dict | None) -> None:
        """Record the accepted order `m` and the adapter's new entry (None: removed), in one atomic write."""
        name = m["name"]
        if entry is None:
            self.state["adapters"].pop(name, None)
        else:
            self.state["adapters"][name] = entry
        highest = max(self.highest(name), m["version"] if m["type"] == "adapter" else 0)
        self.state["orders"][name] = {"created": m["created"], "signature": m["signature"], "highest": highest}
        _atomic_write(self.state_file, json.dumps(self.state, indent=1).encode())

    def drop_partial(self, name: str, version: int) -> None:
        shutil.rmtree(self.partial(name, version, create=False), ignore_errors=True)

    def prune(self) -> None:
        """Drop partial downloads no newer than what was installed, and the oldest inactive versions over the cap."""
        active = {(n, e["version"]) for n, e in self.state["adapters"].items()}
        files = sorted(self.root.glob("*/*.onnx_adapter"), key=lambda f: f.stat().st_mtime)
        total = sum(f.stat().st_size for f in files)
        for f in files:
            if total <= self.cap:
                break
            if (f.parent.name, int(f.stem)) not in active:
                total -= f.stat().st_size
                f.unlink()
        for p in (self.root / ".partial").glob("*"):
            name, _, version = p.name.rpartition("-")
            if not version.isdigit() or int(version) <= self.highest(name):
                shutil.rmtree(p, ignore_errors=True)


def _atomic_write(target: Path, data: bytes) -> None:
    tmp = target.with_name(target.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
