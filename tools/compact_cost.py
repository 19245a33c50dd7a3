"""What a compact folder costs against the same GGUF exported --no-compact: folder size (against the file), and
each kind of load in a fresh process (the first with a graph cache, which converts and writes it; a later one,
from the cache; one without a cache, which converts every time): seconds and peak RSS. Alternates the two folders
`--rounds` times.

    .venv/bin/python tools/compact_cost.py .cache/gguf-types/SmolLM2-135M-Instruct.Q4_K_M.gguf --rounds 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median

LOAD = """
import json, resource, sys, time
from nomoat.edge.model import Model
from nomoat.edge.profile import Profile
t = time.perf_counter()
Model(sys.argv[1], Profile(threads=2, optimized_model_cache=sys.argv[2]))
print(json.dumps({"s": time.perf_counter() - t, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def load(folder: Path, cache: str) -> dict:
    out = subprocess.run([sys.executable, "-c", LOAD, str(folder), cache], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf", type=Path)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="compact-cost-"))
    try:
        folders = {}
        for name, extra in (("compact", []), ("no-compact", ["--no-compact"])):
            folders[name] = work / name
            subprocess.run([sys.executable, "-m", "nomoat", "export", str(a.gguf), "-o", str(folders[name]),
                            "--no-verify", *extra], check=True, capture_output=True)
        results: dict[str, dict[str, list]] = {n: {} for n in folders}
        for _ in range(a.rounds):
            for name, folder in folders.items():
                cache = work / f"cache-{name}"
                shutil.rmtree(cache, ignore_errors=True)
                for kind, c in (("first load (writes the cache)", str(cache)), ("cached load", str(cache)),
                                ("no cache", "")):
                    results[name].setdefault(kind, []).append(load(folder, c))
        file_mib = a.gguf.stat().st_size / 2**20
        print(f"{a.gguf.name}: {file_mib:.1f} MiB")
        for name, folder in folders.items():
            size = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
            print(f"  {name}: folder {size:.1f} MiB ({size / file_mib:.3f}x the file)")
            for kind, runs in results[name].items():
                print(f"    {kind}: {median(r['s'] for r in runs):.2f} s, peak RSS "
                      f"{median(r['peak'] for r in runs):.0f} MiB (median of {len(runs)})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
