#!/usr/bin/env python3
"""A bridged fleet on this machine, from the configs shipped in tools/mosquitto/bridge/: a central Mosquitto and
site Mosquittos bridged to it, each site's uplink through a TCP relay that can be cut (a shop's internet going
down). Used by tests/test_bridge.py and tools/fleet_scale.py; run alone, it starts the topology and prints
how to reach it:

    .venv/bin/python tools/bridged_sites.py --sites 2

The shipped files run as they are, except what only a real deployment has: listeners move to free loopback
ports, TLS lines point at a test CA's files (or go), persistence and passwords live in a temporary folder, and
the bridges' addresses point at their relays. The ACLs (central.acl, and nomoat.acl on the sites) and every
bridge line stay as shipped, so the tests check the topics and permissions a user deploys. Fleet "home", as in
those files.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from soak_mqtt import free_port, wait_port  # tools/ is this script's path

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "tools" / "mosquitto"
FLEET = "home"
PASSWORD = "local-test-password"
_DROPPED = ("certfile", "keyfile", "cafile", "bridge_cafile", "bridge_certfile", "bridge_keyfile")


def local_config(shipped: Path, port: int, folder: Path, passwd: Path, acl: Path, address: str | None = None,
                 site: str | None = None, overrides: dict[str, str] | None = None, tls: Path | None = None) -> str:
    """The shipped config, made to run here (see the module's docstring); `site` renames site-a's bridge;
    `overrides`: the start of a line (an option's name, or more) -> the line to put in its place, with "site-a"
    renamed too (a test's variant of the shipped file). `tls`: a folder with ca.crt, server.crt and server.key
    for the shipped TLS lines (the central listener, the bridges' bridge_cafile), else those lines go."""
    certs = {"certfile": "server.crt", "keyfile": "server.key", "cafile": "ca.crt", "bridge_cafile": "ca.crt"}
    lines = []
    for line in shipped.read_text().splitlines():
        word = line.split(" ", 1)[0]
        if word in _DROPPED:
            if not tls or word not in certs:
                continue
            line = f"{word} {tls / certs[word]}"
        if site:
            line = line.replace("site-a", site)
        line = {"listener": f"listener {port} 127.0.0.1", "persistence_location": f"persistence_location {folder}/",
                "password_file": f"password_file {passwd}", "acl_file": f"acl_file {acl}",
                "remote_password": f"remote_password {PASSWORD}", "address": f"address {address}"}.get(word, line)
        for start, replacement in (overrides or {}).items():
            if line.startswith(start):
                line = replacement.replace("site-a", site) if site else replacement
        lines.append(line)
    if os.geteuid() == 0:  # mosquitto started as root drops to user "mosquitto", who cannot read the temp folder
        lines.append("user root")
    return "\n".join(lines) + "\n"


class Relay:
    """A TCP relay from a local port to a target port that can be cut (open connections dropped, new ones
    refused) and restored: a site's uplink."""

    def __init__(self, target: int):
        self.target, self.port = target, free_port()
        self.up = threading.Event()
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.server: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        self.server = socket.create_server(("127.0.0.1", self.port))
        self.up.set()
        threading.Thread(target=self._accept, args=(self.server,), daemon=True).start()

    def cut(self) -> None:
        self.up.clear()
        try:
            self.server.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        except OSError:
            pass
        self.server.close()
        with self.lock:
            for c in self.conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                c.close()
            self.conns.clear()

    def _accept(self, server: socket.socket) -> None:
        while self.up.is_set():
            try:
                down, _ = server.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                down.close()
                continue
            with self.lock:
                self.conns += [down, up]
            for a, b in ((down, up), (up, down)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class Broker:
    """One Mosquitto with its config file, log and persistence folder."""

    def __init__(self, name: str, folder: Path, config: str, port: int):
        self.name, self.port, self.folder = name, port, folder
        self.conf = folder / f"{name}.conf"
        self.conf.write_text(config)
        self.log = folder / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        with open(self.log, "a") as out:
            self.proc = subprocess.Popen([mosquitto, "-c", str(self.conf), "-v"], stdout=out, stderr=subprocess.STDOUT)
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def rss_mib(self) -> float:
        return rss_mib(self.proc.pid)


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _passwords(path: Path, users: list[str]) -> None:
    path.write_text("")
    for user in users:
        subprocess.run(["mosquitto_passwd", "-b", str(path), user, PASSWORD], check=True, capture_output=True)


class Topology:
    """A central broker and `sites` site brokers bridged to it through relays. Users: `operator` on the central
    broker; on a site, one user per device (its name), added with `add_devices` before the site starts."""

    def __init__(self, sites: int = 2, devices: dict[str, list[str]] | None = None, folder: Path | None = None,
                 site_overrides: dict[str, str] | None = None, tls: Path | None = None):
        self.site_overrides, self.tls = site_overrides, tls
        self.folder = folder or Path(tempfile.mkdtemp(prefix="nomoat-bridged-"))
        self.folder.mkdir(parents=True, exist_ok=True)
        self.site_names = [f"site-{chr(ord('a') + i)}" for i in range(sites)]
        self.devices = {s: list((devices or {}).get(s, [])) for s in self.site_names}
        acl = self.folder / "central.acl"
        shutil.copy(SHIPPED / "bridge" / "central.acl", acl)
        passwd = self.folder / "central.passwd"
        _passwords(passwd, ["operator", *self.site_names])
        port = free_port()
        (self.folder / "central").mkdir()
        self.central = Broker("central", self.folder, local_config(
            SHIPPED / "bridge" / "central.conf", port, self.folder / "central", passwd, acl, tls=tls), port)
        self.relays: dict[str, Relay] = {}
        self.sites: dict[str, Broker] = {}
        for site in self.site_names:
            self.relays[site] = Relay(self.central.port)
            self._start_site(site)

    def _start_site(self, site: str) -> None:
        folder = self.folder / site
        folder.mkdir(exist_ok=True)
        acl = self.folder / "nomoat.acl"
        shutil.copy(SHIPPED / "nomoat.acl", acl)
        passwd = folder / "nomoat.passwd"
        _passwords(passwd, self.devices[site] or ["nobody"])
        port = self.sites[site].port if site in self.sites else free_port()
        self.sites[site] = Broker(site, self.folder, local_config(
            SHIPPED / "bridge" / "site-a.conf", port, folder, passwd, acl, f"127.0.0.1:{self.relays[site].port}",
            site, self.site_overrides, self.tls), port)

    def restart_site(self, site: str) -> None:
        """Stop and start a site's broker (its persistence keeps the devices' sessions and retained messages)."""
        self.sites[site].stop()
        self._start_site(site)

    def device_config(self, site: str, device: str) -> Path:
        """A nomoat.toml for `device` on `site` (its broker, fleet, user and password)."""
        path = self.folder / f"{device}.toml"
        path.write_text(f'[mqtt]\nbroker = "{self.sites[site].url}"\nfleet = "{FLEET}"\ndevice = "{device}"\n'
                        f'username = "{device}"\npassword = "{PASSWORD}"\n')
        return path

    def operator(self):
        """MqttSettings for the operator on the central broker."""
        from nomoat.edge.profile import MqttSettings

        if self.tls:
            return MqttSettings(broker=f"mqtts://127.0.0.1:{self.central.port}", fleet=FLEET, username="operator",
                                password=PASSWORD, ca_file=str(self.tls / "ca.crt"))
        return MqttSettings(broker=self.central.url, fleet=FLEET, username="operator", password=PASSWORD)

    def bridge_states(self, which: str = "bridge") -> dict[str, str]:
        """Each site's bridge notification as the central broker holds it ("1" up, "0" down); `which`: "bridge"
        (the devices' connection) or "pool"."""
        import paho.mqtt.client as mqtt

        found: dict[str, str] = {}
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        c.username_pw_set("operator", PASSWORD)
        if self.tls:
            c.tls_set(ca_certs=str(self.tls / "ca.crt"))
        c.on_message = lambda cl, u, m: found.__setitem__(m.topic.split("/")[3], m.payload.decode())
        c.on_connect = lambda cl, u, f, r, p: cl.subscribe(f"nomoat/{FLEET}/sites/+/{which}", qos=1)
        c.connect("127.0.0.1", self.central.port)
        c.loop_start()
        time.sleep(0.5)
        c.disconnect()
        c.loop_stop()
        return found

    def wait_bridges(self, state: str = "1", timeout: float = 60) -> None:
        """Until both connections of every site's bridge are in `state`."""
        end = time.time() + timeout
        while time.time() < end:
            states = [self.bridge_states(), self.bridge_states("pool")]
            if all(s.get(site) == state for s in states for site in self.site_names):
                return
        raise RuntimeError(f"bridges are not all {state!r}: {self.bridge_states()} {self.bridge_states('pool')}")

    def close(self) -> None:
        for b in [*self.sites.values(), self.central]:
            b.stop()
        for r in self.relays.values():
            r.cut()
        shutil.rmtree(self.folder, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, default=2)
    ap.add_argument("--devices", type=int, default=1, help="device users per site (dev-a1, dev-a2, …)")
    args = ap.parse_args()
    names = [f"site-{chr(ord('a') + i)}" for i in range(args.sites)]
    devices = {s: [f"dev-{s[-1]}{i + 1}" for i in range(args.devices)] for s in names}
    t = Topology(args.sites, devices)
    t.wait_bridges()
    print(f"central: {t.central.url} (user operator, password {PASSWORD})")
    for s in names:
        print(f"{s}: {t.sites[s].url}; devices: " + ", ".join(f"{d} (nomoat serve MODEL --config "
                                                               f"{t.device_config(s, d)})" for d in devices[s]))
    print(f"logs and configs: {t.folder}; Ctrl-C stops")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        t.close()


if __name__ == "__main__":
    main()
