#!/data/data/com.termux/files/usr/bin/bash
# Android (Termux from F-Droid): nomoat inside a proot-distro Debian, with the official aarch64 wheels.
# Termux's own onnxruntime package has been broken on import (termux-packages #28769); Debian's glibc
# userland takes the same manylinux aarch64 wheels as Raspberry Pi OS instead.
#   bash install.sh nomoat-0.1.0-py3-none-any.whl [model-folder]
# Safe to run again (an upgrade). Works with proot-distro 4.x and 5.x: files go in through `proot-distro login`,
# never through the container's folder, whose path changed between them. Any failed step stops it.
set -euo pipefail
WHEEL=${1:?usage: install.sh NOMOAT_WHEEL [MODEL_FOLDER]}
MODEL=${2:-}
[ -f "$WHEEL" ] || { echo "no such wheel: $WHEEL" >&2; exit 1; }
[ -z "$MODEL" ] || [ -f "$MODEL/nomoat.json" ] || { echo "not a nomoat model folder: $MODEL" >&2; exit 1; }
in_debian() { proot-distro login debian -- "$@"; }

pkg install -y proot-distro  # termux-wake-lock (start-nomoat) is in termux-tools, which Termux always has
if in_debian true >/dev/null 2>&1; then
  echo "Debian is installed"
else
  proot-distro install debian
fi
in_debian sh -c 'cat > /root/nomoat.whl.tmp' < "$WHEEL"
in_debian bash -c "set -e; apt-get update -qq; apt-get install -y -qq python3-venv
  [ -x /opt/nomoat/bin/pip ] || python3 -m venv /opt/nomoat
  mv /root/nomoat.whl.tmp /root/$(basename "$WHEEL")
  /opt/nomoat/bin/pip install -q --upgrade /root/$(basename "$WHEEL")"
if [ -n "$MODEL" ]; then
  (cd "$(dirname "$MODEL")" && tar -cf - "$(basename "$MODEL")") | in_debian sh -c 'mkdir -p /root/models && tar -C /root/models -xf -'
fi
in_debian sh -c '[ -f /root/.config/nomoat/nomoat.toml ] || { mkdir -p /root/.config/nomoat && printf "%s\n" \
  "profile = \"android-termux\"" "[mqtt]" "broker = \"mqtt://192.168.1.10:1883\"  # your broker" \
  "fleet = \"phones\"" "device = \"phone1\"" > /root/.config/nomoat/nomoat.toml; }'
mkdir -p ~/.termux/boot
cp "$(dirname "$0")/start-nomoat" ~/.termux/boot/ && chmod +x ~/.termux/boot/start-nomoat
in_debian /opt/nomoat/bin/nomoat doctor --profile android-termux || echo "nomoat doctor reported problems (above)" >&2
cat <<'TXT'
installed. Next:
  - edit the broker, fleet and device: proot-distro login debian -- nano /root/.config/nomoat/nomoat.toml
  - install Termux:Boot (F-Droid) and open it once; ~/.termux/boot/start-nomoat then starts nomoat at boot
  - Android settings: Termux and Termux:Boot "unrestricted" battery use; on Android 12+ the phantom-process killer
    stops background children (adb: settings put global settings_enable_monitor_phantom_procs false)
TXT
