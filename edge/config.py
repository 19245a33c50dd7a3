"""The user's own configuration: which profile, where the broker is (TLS, credentials), fleet and device, the
keys trusted to sign adapter pushes, and where state goes. Bundled profiles (firmware-configs/) describe the
board only.

Later wins: built-in defaults < the profile < the config file < environment variables (NOMOAT_PROFILE,
NOMOAT_BROKER, NOMOAT_FLEET, NOMOAT_DEVICE, read by the command line) < command-line flags.

The config file is the first of: `--config FILE` (or NOMOAT_CONFIG), `$XDG_CONFIG_HOME/nomoat/nomoat.toml`
(default `~/.config/nomoat/nomoat.toml`), `/etc/nomoat/nomoat.toml`. None is needed. Example:

    profile = "raspberry-pi-5"
    trusted_keys = ["<the operator's public key>"]
    # adapter_store = "/var/lib/nomoat/adapters"   (default: $STATE_DIRECTORY or ~/.local/share/nomoat)
    # draft_model = "/opt/nomoat/models/small"      (speculative decoding with a smaller model, same tokenizer)
    # kv_cache = "int8"                              (a quarter of the float32 cache's memory, ~1 point of agreement)
    [mqtt]
    broker = "mqtts://broker.lan:8883"   # TLS only for mqtts:// or a ca_file
    fleet = "home"
    device = "pi1"
    username = "pi1"
    password_file = "/etc/nomoat/password"
    ca_file = "/etc/nomoat/ca.crt"
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import fields
from pathlib import Path

from .profile import MqttSettings, Profile, ProfileError, check_values, load_profile

# what a user's file may set besides [mqtt]; the board's settings come from its profile
# (and two trade-offs that are the user's to make: a draft model's memory, and the KV cache's type)
USER_KEYS = {"profile", "adapter_store", "adapter_store_mb", "trusted_keys", "optimized_model_cache", "draft_model",
             "kv_cache"}


def config_path(explicit: str | None = None) -> Path | None:
    """The config file in force, or None. An explicit file (flag or NOMOAT_CONFIG) must exist."""
    explicit = explicit or os.environ.get("NOMOAT_CONFIG")
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ProfileError(f"config file not found: {path}")
        return path
    xdg = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    for path in (xdg / "nomoat" / "nomoat.toml", Path("/etc/nomoat/nomoat.toml")):
        if path.is_file():
            return path
    return None


def read_config(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ProfileError(f"unreadable config file {path}: {e}") from e
    unknown = set(data) - USER_KEYS - {"mqtt"}
    mqtt_keys = {f.name for f in fields(MqttSettings)} | {"password_file"}
    unknown |= {f"mqtt.{k}" for k in set(data.get("mqtt", {})) - mqtt_keys}
    if unknown:
        raise ProfileError(f"{path}: unknown key(s) {', '.join(sorted(unknown))} (the board's settings belong in "
                           f"a profile; here: {', '.join(sorted(USER_KEYS))} and [mqtt] {', '.join(sorted(mqtt_keys))})")
    return data


def settings(profile: str | None = None, config: str | None = None, broker: str | None = None,
             fleet: str | None = None, device: str | None = None, pick: bool = False) -> Profile:
    """The profile with the user's configuration and the flags applied (see the module docstring). With `pick`
    and no profile named anywhere, the bundled profile `nomoat doctor` picks for this device."""
    path = config_path(config)
    user = read_config(path)
    name = profile or user.get("profile")
    here = None
    if pick:  # serve: this device's pick, and a context that fits its memory
        from .doctor import fitting_context, fitting_profiles, inspect_device

        here = inspect_device()
    picked = (fitting_profiles(here) or [None])[0] if here and not name else None
    prof = load_profile(name or picked)
    prof.picked = bool(picked)  # (for the log: the device's pick, not the user's choice)
    if here:
        prof.context_length = fitting_context(prof, here)
    where = str(path)
    for key in USER_KEYS - {"profile"}:
        if key in user:
            default = getattr(Profile(), key)
            if not isinstance(user[key], type(default)) or isinstance(user[key], bool):
                raise ProfileError(f"{where}: {key} must be {type(default).__name__}")
            setattr(prof, key, user[key])
    check_values(prof, where)
    mqtt = dict(user.get("mqtt", {}))
    if "password_file" in mqtt:  # a secret kept out of a world-readable file
        try:
            mqtt["password"] = Path(mqtt.pop("password_file")).expanduser().read_text().strip()
        except OSError as e:
            raise ProfileError(f"{where}: password_file: {e}") from e
    for key, value in mqtt.items():
        if not isinstance(value, type(getattr(MqttSettings(), key))):
            raise ProfileError(f"{where}: [mqtt] {key} has the wrong type")
        setattr(prof.mqtt, key, value)
    for key, value in (("broker", broker), ("fleet", fleet), ("device", device)):
        if value:
            setattr(prof.mqtt, key, value)
    return prof


def state_dir() -> Path:
    """Where the daemon keeps state (the adapter store) by default: systemd's StateDirectory= when it runs as a
    service, else the user's XDG data folder; never a folder only root can write."""
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "nomoat"
