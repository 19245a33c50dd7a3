"""Fleet adapter push: signed manifests and chunks over MQTT, verified and hot-swapped on devices.

Wire format (docs/protocol.md, "Adapter push"):
  {prefix}/{fleet}/adapters/{name}                      retained signed manifest (JSON)
  {prefix}/{fleet}/adapters/{name}/{version}/{index}    retained raw chunk (<= chunk_size bytes)
  {prefix}/{fleet}/{device}/events                      device events: received, verified, installed,
                                                        activated, rejected (with reason)
The manifest is signed with Ed25519 over its canonical JSON (sorted keys, no spaces) without the
"signature" field. Devices trust only the public keys pinned in their profile.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

log = logging.getLogger("nomoat.fleet")
DEFAULT_CHUNK = 128 * 1024


class PushRejected(Exception):
    pass


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


# ---- operator side ----------------------------------------------------------------------------------
def build_push(adapter_file: Path, name: str, version: int, base_model_hash: str, key: Ed25519PrivateKey,
               chunk_size: int = DEFAULT_CHUNK, activate: bool = False, scale: float = 1.0,
               expires: float | None = None) -> tuple[dict, list[bytes]]:
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
    return sign({"type": action, "name": name, "version": int(version), "created": time.time()}, key)


# ---- device side -------------------------------------------------------------------------------------
class AdapterStore:
    """Installed adapters on disk: {root}/{name}/{version}.onnx_adapter, state in {root}/state.json.

    Every write is temp file + fsync + rename, so a power cut leaves the previous state intact.
    """

    def __init__(self, root: Path, cap_bytes: int):
        self.root, self.cap = Path(root), cap_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self.state_file = self.root / "state.json"
        self.state = json.loads(self.state_file.read_text()) if self.state_file.exists() else {"adapters": {}}

    def installed(self, name: str) -> dict | None:
        return self.state["adapters"].get(name)

    def path(self, name: str, version: int) -> Path:
        return self.root / name / f"{version}.onnx_adapter"

    def partial(self, name: str, version: int) -> Path:
        p = self.root / ".partial" / f"{name}-{version}"
        p.mkdir(parents=True, exist_ok=True)
        return p

    def install(self, name: str, version: int, data: bytes) -> Path:
        target = self.path(name, version)
        target.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(target, data)
        return target

    def set_state(self, name: str, entry: dict | None) -> None:
        if entry is None:
            self.state["adapters"].pop(name, None)
        else:
            self.state["adapters"][name] = entry
        _atomic_write(self.state_file, json.dumps(self.state, indent=1).encode())

    def prune(self) -> None:
        """Drop partial downloads of installed versions and the oldest inactive versions over the cap."""
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
            entry = self.state["adapters"].get(name)
            if entry and int(version) <= entry["version"]:
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
