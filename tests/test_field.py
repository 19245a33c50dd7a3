"""A field rehearsal on this machine: what a Raspberry Pi owner does, as the unprivileged user a service runs as,
against a Mosquitto with TLS, a password file and the bundled ACL. The config files are the README's, the clients
are Mosquitto's own (`mosquitto_pub`/`mosquitto_sub`, MQTT 5 and 3.1.1), the operator pushes a signed adapter
with `nomoat fleet`, and the daemon is stopped with SIGTERM and started again. It runs twice: with this machine's
Python, and on an emulated Raspberry Pi 5 (Cortex-A76, ../shared/tools/arm64), where the user installs nomoat's
wheel with the aarch64 Python's own pip and `nomoat serve` picks the bundled raspberry-pi-5 profile itself.
(The kernels on emulated Cortex-A72/A76 are tests/test_arm64.py.)"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import ROOT, mosquitto_path
from test_daemon import free_port

NOBODY = 65534
pytestmark = [pytest.mark.mqtt, pytest.mark.slow, pytest.mark.skipif(
    not (mosquitto_path() and shutil.which("mosquitto_passwd") and shutil.which("mosquitto_pub")
         and shutil.which("setpriv") and os.geteuid() == 0),
    reason="needs mosquitto, mosquitto-clients, setpriv and root (to become another user)")]


def make_certificates(folder: Path) -> None:
    """A CA and a server certificate for localhost / 127.0.0.1, as a user makes them for their broker."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def cert(subject, issuer, key, signer, ca: bool, sans=()):
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
             .not_valid_after(now + datetime.timedelta(days=30))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        return b.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nomoat test CA")])
    server_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    ca = cert(ca_name, ca_name, ca_key, ca_key, True)
    server = cert(server_name, ca_name, key, ca_key, False,
                  [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    pem = serialization.Encoding.PEM
    (folder / "ca.crt").write_bytes(ca.public_bytes(pem))
    (folder / "server.crt").write_bytes(server.public_bytes(pem))
    (folder / "server.key").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL,
                                                          serialization.NoEncryption()))


def as_nobody(*cmd, home: Path, env: dict | None = None, **kw) -> subprocess.Popen:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("NOMOAT_", "XDG_"))}, **(env or {})}
    env.update(HOME=str(home), PYTHONUNBUFFERED="1")
    return subprocess.Popen(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cmd],
                            env=env, cwd=home, **kw)


@pytest.fixture
def field(slots, tmp_path):
    """A world-readable work folder (the test's tmp_path is root's alone), torn down afterwards."""
    work = Path(tempfile.mkdtemp(prefix="nomoat-field-"))
    work.chmod(0o755)
    yield work
    if not os.environ.get("NOMOAT_KEEP_FIELD"):
        shutil.rmtree(work, ignore_errors=True)


def status(port, ca, timeout=60) -> dict:
    """The device's retained status, read with mosquitto_sub as the operator."""
    out = subprocess.run(["mosquitto_sub", "-h", "localhost", "-p", str(port), "--cafile", str(ca), "-u", "operator",
                          "-P", "op-pw", "-t", "nomoat/home/pi1/status", "-C", "1", "-W", str(timeout)],
                         capture_output=True, text=True, timeout=timeout + 10)
    return json.loads(out.stdout) if out.stdout.strip() else {}


def wait_online(port, ca, timeout=180) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        s = status(port, ca, timeout=5)
        if s.get("state") == "online":
            return s
        time.sleep(0.5)
    raise AssertionError("the daemon never reported online")


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_a_pi_owners_first_hour_as_an_unprivileged_user(machine, field, slots, adapter_file, key, request):
    key_path, pub = key
    certs = field / "certs"
    certs.mkdir(mode=0o755)
    make_certificates(certs)
    for f in certs.iterdir():
        f.chmod(0o644)  # mosquitto reads them as its own user
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(field / "passwd"), "pi1", "pi1-pw"], check=True)
    subprocess.run(["mosquitto_passwd", "-b", str(field / "passwd"), "operator", "op-pw"], check=True)
    (field / "passwd").chmod(0o644)
    shutil.copy(ROOT / "tools" / "mosquitto" / "nomoat.acl", field / "nomoat.acl")
    port = free_port()
    (field / "mosquitto.conf").write_text(
        f"per_listener_settings false\nlistener {port} 127.0.0.1\ncafile {certs}/ca.crt\ncertfile {certs}/server.crt\n"
        f"keyfile {certs}/server.key\nallow_anonymous false\npassword_file {field}/passwd\n"
        f"acl_file {field}/nomoat.acl\npersistence false\nlog_dest stdout\nlog_type all\n")
    broker = subprocess.Popen([mosquitto_path(), "-c", str(field / "mosquitto.conf")],
                              stdout=open(field / "mosquitto.log", "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
    # the device: the model copied over as the README says, the config file in its user's home
    home = field / "home"
    shutil.copytree(slots, home / "models" / "m")
    config = home / ".config" / "nomoat"
    config.mkdir(parents=True)
    (config / "password").write_text("pi1-pw\n")
    (config / "nomoat.toml").write_text(
        f'trusted_keys = ["{pub}"]\n[mqtt]\nbroker = "mqtts://localhost:{port}"\nfleet = "home"\ndevice = "pi1"\n'
        f'username = "pi1"\npassword_file = "{config}/password"\nca_file = "{certs}/ca.crt"\n')
    subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(home)], check=True)
    (config / "password").chmod(0o600)
    nomoat, operator_nomoat, env, profile = [sys.executable, "-m", "nomoat"], [sys.executable, "-m", "nomoat"], {}, \
        "x86-64-dev"
    if machine == "aarch64":
        launcher = request.getfixturevalue("arm64")
        env, profile = {"ARM64_CPU": "cortex-a76", "PYTHONPATH": str(home / "lib")}, "raspberry-pi-5"
        subprocess.run([str(launcher), "-c", "pass"], env=dict(os.environ, **env), check=True)  # its cpuinfo, as root
        # the user installs the wheel with pip (its dependencies are the system's, as apt would install them)
        wheel = next(launcher.parent.parent.glob("dist/nomoat-*.whl"))
        pip = as_nobody(str(launcher), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                        str(home / "lib"), str(wheel), home=home, env=env, stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, text=True)
        assert pip.wait(timeout=600) == 0, pip.stdout.read()
        nomoat = [str(launcher), "-m", "nomoat"]
    daemon = None
    try:
        doctor = as_nobody(*nomoat, "doctor", "--model", str(home / "models" / "m"), home=home, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        checked = doctor.communicate(timeout=600)[0]
        assert f"fits         {profile}" in checked and "fidelity" in checked, checked
        daemon = as_nobody(*nomoat, "serve", str(home / "models" / "m"), home=home, env=env,
                           stdout=open(field / "serve.log", "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
        first = wait_online(port, certs / "ca.crt")
        assert first["device"] == "pi1" and first["fleet"] == "home"
        # ask with Mosquitto's own clients, MQTT 5 and 3.1.1, over TLS with the operator's password
        for version, qos, to in (("mqttv5", 1, "pi1/prompt"), ("mqttv311", 0, "pi1/prompt"), ("mqttv5", 2, "prompt")):
            rid = f"field-{version}-{qos}"  # the last one through the fleet's pool (a shared subscription)
            sub = subprocess.Popen(["mosquitto_sub", "-h", "localhost", "-p", str(port), "--cafile", str(certs / "ca.crt"),
                                    "-u", "operator", "-P", "op-pw", "-V", version, "-t", f"nomoat/home/+/reply/{rid}",
                                    "-C", "1", "-W", "30"], stdout=subprocess.PIPE, text=True)
            time.sleep(0.5)
            subprocess.run(["mosquitto_pub", "-h", "localhost", "-p", str(port), "--cafile", str(certs / "ca.crt"),
                            "-u", "operator", "-P", "op-pw", "-V", version, "-q", str(qos), "-t", f"nomoat/home/{to}",
                            "-m", json.dumps({"id": rid, "prompt": "The capital", "max_tokens": 4, "stream": False})],
                           check=True, timeout=30)
            assert json.loads(sub.communicate(timeout=40)[0])["finish_reason"] in ("stop", "length")
        # the operator pushes a signed adapter with its own config file (credentials, CA)
        operator = field / "operator.toml"
        operator.write_text(f'[mqtt]\nbroker = "mqtts://localhost:{port}"\nfleet = "home"\nusername = "operator"\n'
                            f'password = "op-pw"\nca_file = "{certs}/ca.crt"\n')
        push = subprocess.run([*operator_nomoat, "fleet", "--config", str(operator), "push", str(adapter_file), "--name", "tone",
                               "--key", str(key_path), "--activate", "--wait-for", "1", "--timeout", "60"],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert push.returncode == 0 and "activated" in push.stdout, push.stdout + push.stderr + (field / "serve.log").read_text()[-3000:] + (field / "mosquitto.log").read_text()[-3000:]
        stores = list((home / ".local" / "share" / "nomoat" / "adapters").glob("*/state.json"))
        assert len(stores) == 1 and stores[0].stat().st_uid == NOBODY  # in the user's own folders
        # SIGTERM, as systemctl restart sends it, and back: the adapter is still the default
        daemon.terminate()
        assert daemon.wait(timeout=60) == 0
        assert status(port, certs / "ca.crt")["state"] == "offline"
        daemon = as_nobody(*nomoat, "serve", str(home / "models" / "m"), home=home, env=env,
                           stdout=open(field / "serve2.log", "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
        again = wait_online(port, certs / "ca.crt")
        assert again["default_adapters"] == [{"name": "tone", "scale": 1.0}] and again["installed"] == {"tone": 1}
    finally:
        if daemon:
            daemon.kill()
            daemon.wait()
        broker.kill()
        broker.wait()
    log = (field / "serve.log").read_text()
    assert "Traceback" not in log and f"profile {profile} (picked for this device" in log, log
