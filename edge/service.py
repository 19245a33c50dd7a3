"""`nomoat service`: the systemd unit for `nomoat serve` with this install's venv and a model folder.

tools/systemd/nomoat.service is this unit rendered for a Raspberry Pi OS user `pi` (a test keeps them equal).
"""

from __future__ import annotations

UNIT = """\
# nomoat as a service on Raspberry Pi OS (or any systemd Linux). Edit the two paths in ExecStart (your venv and your
# model folder), write /etc/nomoat/nomoat.toml (broker, fleet, device, keys: README, "Your configuration"), then:
#   sudo cp tools/systemd/nomoat.service /etc/systemd/system/ && sudo systemctl enable --now nomoat
#   journalctl -u nomoat -f
# (`nomoat service install MODEL` writes it with your paths.)
[Unit]
Description=nomoat LLM daemon (MQTT)
Wants=network-online.target
After=network-online.target

[Service]
# A user of its own, made by systemd; it can read the venv and the model (both world-readable) and write only
# its state (adapter store, graph cache) in /var/lib/nomoat.
DynamicUser=yes
StateDirectory=nomoat
ConfigurationDirectory=nomoat
Environment=HOME=/var/lib/nomoat
ExecStart={nomoat} serve {model} --config {config} --log-format json
Restart=on-failure
RestartSec=5
# SIGTERM: the running request is handed back (QoS 1 prompts come again after the restart), status goes offline
KillSignal=SIGTERM
TimeoutStopSec=30
MemoryMax={memory_max}
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=read-only
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
LockPersonality=yes

[Install]
WantedBy=multi-user.target
"""


def render(nomoat: str, model: str, config: str = "/etc/nomoat/nomoat.toml", memory_max: str = "2G") -> str:
    for value in (nomoat, model, config):
        if any(c.isspace() or c in "%$\\\"'" for c in value):
            raise ValueError(f"{value!r}: a path for a systemd unit must have no spaces, quotes, % or $")
    return UNIT.format(nomoat=nomoat, model=model, config=config, memory_max=memory_max)
