"""Run the edge runtime on emulated aarch64 and print the greedy tokens (compare with the x86 run).

    python tools/arm64_check.py INT4_MODEL SLOTS_MODEL ADAPTER                       # x86 reference
    ARM64_CPU=cortex-a72 PYTHONPATH=$PWD ARM64_ROOT=/tmp/arm64env \
        /tmp/arm64env/run-arm64.sh tools/arm64_check.py INT4_MODEL SLOTS_MODEL ADAPTER
(set up with ARM64_EXTRA_WHEELS="tokenizers paho-mqtt click jinja2 cryptography"
 ../shared/tools/arm64/setup-arm64-python.sh /tmp/arm64env)
"""
import json
import platform
import sys

from edge.generate import Generator
from edge.profile import Profile

m, s, a = sys.argv[1:4]
out = {"machine": platform.machine()}
for lvl in (1, 4):
    out[f"acc{lvl}"] = Generator(m, Profile(accuracy_level=lvl, threads=1)).generate("The capital of France is", max_tokens=8).tokens
g = Generator(s, Profile(threads=1))
out["base"] = g.generate("The capital", max_tokens=8).tokens
g.load_adapter(a)
out["adapter"] = g.generate("The capital", max_tokens=8, adapters=(("a1", 1.0),)).tokens
out["off"] = g.generate("The capital", max_tokens=8).tokens
print(json.dumps(out))
