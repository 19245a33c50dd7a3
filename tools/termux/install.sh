#!/data/data/com.termux/files/usr/bin/bash
# Android (Termux from F-Droid): nomoat inside a proot-distro Debian, with the official aarch64 wheels.
# Termux's own onnxruntime package has been broken on import (termux-packages #28769); Debian's glibc
# userland takes the same manylinux aarch64 wheels as Raspberry Pi OS instead.
#   bash install.sh nomoat-0.1.0-py3-none-any.whl [model-folder]
set -euo pipefail
WHEEL=${1:?usage: install.sh NOMOAT_WHEEL [MODEL_FOLDER]}
pkg install -y proot-distro termux-api
proot-distro list 2>/dev/null | grep -q "debian.*installed" || proot-distro install debian
ROOTFS=$PREFIX/var/lib/proot-distro/installed-rootfs/debian
cp "$WHEEL" "$ROOTFS/root/"
proot-distro login debian -- bash -c "apt-get update -qq && apt-get install -y -qq python3-venv && \
  python3 -m venv /opt/nomoat && /opt/nomoat/bin/pip install -q /root/$(basename "$WHEEL") && \
  /opt/nomoat/bin/nomoat doctor --profile android-termux || true"
if [ -n "${2:-}" ]; then mkdir -p "$ROOTFS/root/models" && cp -r "$2" "$ROOTFS/root/models/"; fi
mkdir -p ~/.termux/boot
cp "$(dirname "$0")/start-nomoat" ~/.termux/boot/ && chmod +x ~/.termux/boot/start-nomoat
echo "installed; the daemon starts at boot through Termux:Boot (~/.termux/boot/start-nomoat)"
