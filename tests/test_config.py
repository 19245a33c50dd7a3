"""The user's configuration (edge/config.py) and the first steps of a user on a board: bundled profiles carry no
broker, TLS, keys or root-only paths; the README's `nomoat serve` line starts; state goes where the user can
write; errors say what is wrong in one line."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tomllib

import pytest
from conftest import ROOT, mosquitto_path
from nomoat.edge.config import settings, state_dir
from nomoat.edge.profile import ProfileError, bundled_profiles


def test_bundled_profiles_describe_the_board_only():
    for name, path in bundled_profiles().items():
        data = tomllib.loads(path.read_text())
        assert not set(data) & {"mqtt", "adapter_store", "trusted_keys", "profile"}, name  # the user's, not the board's
        assert "/var/lib" not in path.read_text() and "/etc/" not in path.read_text().split("# Broker")[0], name


def test_config_file_env_and_flags_in_that_order(tmp_path, monkeypatch):
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    cfg = tmp_path / "nomoat.toml"
    cfg.write_text(f'profile = "raspberry-pi-4"\ntrusted_keys = ["ab"]\nadapter_store = "/srv/a"\n[mqtt]\n'
                   f'broker = "mqtts://broker.lan:8883"\nfleet = "home"\ndevice = "pi1"\nusername = "pi1"\n'
                   f'password_file = "{secret}"\n')
    monkeypatch.setenv("NOMOAT_CONFIG", str(cfg))
    p = settings()
    assert p.name == "raspberry-pi-4" and p.threads == 4  # the board from its profile
    assert (p.mqtt.broker, p.mqtt.fleet, p.mqtt.device, p.mqtt.password) == ("mqtts://broker.lan:8883", "home",
                                                                            "pi1", "s3cret")
    assert p.trusted_keys == ["ab"] and p.adapter_store == "/srv/a"
    p = settings(profile="x86-64-dev", broker="mqtt://127.0.0.1:1", device="pi2")  # flags (and env) win
    assert p.name == "x86-64-dev" and p.mqtt.broker == "mqtt://127.0.0.1:1" and p.mqtt.device == "pi2"
    assert p.mqtt.fleet == "home"
    # the XDG location, when no file is named
    monkeypatch.delenv("NOMOAT_CONFIG")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert settings().mqtt.fleet == "default"
    (tmp_path / "xdg" / "nomoat").mkdir(parents=True)
    (tmp_path / "xdg" / "nomoat" / "nomoat.toml").write_text('[mqtt]\nfleet = "xdg"\n')
    assert settings().mqtt.fleet == "xdg"


@pytest.mark.parametrize("text,error", [
    ("threads = 4\n", "unknown key(s) threads"),
    ("[mqtt]\nbrokr = 'x'\n", "mqtt.brokr"),
    ("[mqtt]\nkeepalive = 'x'\n", "keepalive has the wrong type"),
    ("[mqtt]\npassword_file = '/nonexistent/pw'\n", "password_file"),
])
def test_config_file_mistakes_are_named(tmp_path, text, error):
    cfg = tmp_path / "nomoat.toml"
    cfg.write_text(text)
    with pytest.raises(ProfileError, match=error.replace("(", r"\(").replace(")", r"\)")):
        settings(config=str(cfg))
    with pytest.raises(ProfileError, match="config file not found"):
        settings(config=str(tmp_path / "missing.toml"))


def test_state_goes_where_the_user_can_write(monkeypatch, tmp_path):
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert state_dir() == tmp_path / "data" / "nomoat"
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/nomoat")  # systemd's StateDirectory=nomoat
    assert state_dir().as_posix() == "/var/lib/nomoat"


def run_cli(*args, env=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "nomoat", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, **(env or {})})


@pytest.mark.mqtt
@pytest.mark.skipif(not mosquitto_path(), reason="mosquitto is not installed")
def test_the_readme_serve_line_with_a_pi_profile_starts_and_keeps_its_state_in_the_users_folders(broker, slots,
                                                                                                 tmp_path, key):
    """The Pi profiles set ca_file=/etc/nomoat/ca.crt (TLS forced for mqtt://: FileNotFoundError) and an adapter
    store in /var/lib/nomoat (PermissionError for the service's user)."""
    from test_daemon import wait_status

    _, pub = key
    env = {"HOME": str(tmp_path / "home"), "XDG_DATA_HOME": str(tmp_path / "data"), "NOMOAT_CONFIG": "",
           "XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    proc = subprocess.Popen([sys.executable, "-m", "nomoat", "serve", str(slots), "--broker", broker.url, "--fleet",
                             "f", "--device", "pi1", "--profile", "raspberry-pi-5", "--trust", pub],
                            cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        wait_status(broker, "pi1", "online", timeout=60)
        stores = list((tmp_path / "data" / "nomoat" / "adapters").iterdir())
        assert len(stores) == 1 and stores[0].is_dir()  # in the user's data folder, not /var/lib
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out


def test_one_line_errors_for_a_missing_ca_file_a_gguf_and_no_device(tmp_path, slots, smollm2_gguf_or_file):
    cfg = tmp_path / "nomoat.toml"
    cfg.write_text('[mqtt]\nca_file = "/nonexistent/ca.crt"\ndevice = "pi1"\n')
    out = run_cli("serve", str(slots), "--config", str(cfg))
    assert out.returncode == 1 and "ca_file /nonexistent/ca.crt does not exist" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    out = run_cli("serve", str(smollm2_gguf_or_file), "--device", "pi1", env={"NOMOAT_CONFIG": ""})
    assert out.returncode == 1 and "is a file, not a model folder: export it first" in out.stderr, out.stderr
    out = run_cli("ask", "hi", "--broker", "mqtt://127.0.0.1:9", env={"NOMOAT_CONFIG": ""})
    assert out.returncode == 1 and "which device?" in out.stderr, out.stderr
    out = run_cli("ask", "hi", "--broker", "mqtt://127.0.0.1:9", "--device", "pi1", env={"NOMOAT_CONFIG": ""})
    assert out.returncode == 1 and "cannot reach the broker at mqtt://127.0.0.1:9" in out.stderr, out.stderr


@pytest.fixture
def smollm2_gguf_or_file(tmp_path):
    """A file where a model folder is expected (the real GGUF's name; its content does not matter here)."""
    f = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    f.write_bytes(b"GGUF")
    return f


def test_an_exported_folder_is_readable_by_other_users(exported):
    folder = exported("fp32-base", precision="fp32")
    mode = stat.S_IMODE(folder.stat().st_mode)
    assert mode & 0o005 == 0o005, oct(mode)  # mkdtemp's 0700 kept the service's user out


def test_serve_without_a_profile_takes_doctors_pick_and_says_so(tmp_path, monkeypatch):
    from nomoat.edge.doctor import fitting_profiles, inspect_device

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv("NOMOAT_CONFIG", raising=False)
    want = (fitting_profiles(inspect_device()) or [None])[0]
    p = settings(pick=True)
    assert p.name == (want or "default") and p.picked == bool(want)
    assert settings(profile="raspberry-pi-4", pick=True).picked is False
    assert settings().name == "default"  # `ask` and friends: no pick needed
