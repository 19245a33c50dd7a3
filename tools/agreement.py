#!/usr/bin/env python3
"""Teacher-forced top-1 agreement with the transformers fp32 reference of a GGUF file, over a longer text than
`nomoat export --verify`'s 76 tokens: nomoat's exports of the file and llama.cpp (native build) on the same file,
on the same token ids.

    .venv/bin/python tools/agreement.py .cache/gguf-types/SmolLM2-135M-Instruct.Q5_K_M.gguf \\
        .cache/gguf-types/nomoat-Q5_K_M .cache/gguf-types/nomoat-Q5_K_M-exact \\
        --llama-cpp .cache/llamacpp/llama_cpp_python-0.3.36 --tokens 1024

The text is the GPL-3 (/usr/share/common-licenses/GPL-3 or --text), cut into passages of --passage tokens, each
scored from its first token. llama.cpp runs through the llama-cpp-python sources of that sdist over the natively
built libllama (LLAMA_CPP_LIB_PATH), so no second llama.cpp build is needed; its Python dependencies (diskcache,
jinja2) go to .cache/llamacpp/pydeps. Prints one line per engine: agreement, tokens, mean KL.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
LLAMA_SCRIPT = """
import json, sys, numpy as np
from llama_cpp import Llama
gguf, passages = sys.argv[1], json.load(sys.stdin)
llm = Llama(gguf, n_ctx=max(map(len, passages)) + 8, logits_all=True, n_threads=2, verbose=False)
out = []
for ids in passages:
    llm.reset()
    llm.eval(ids)
    out.append(np.array(llm.scores[:len(ids)], dtype=np.float32))  # a copy: scores is a view of a reused buffer
np.save(sys.stdout.buffer, np.concatenate(out))
"""


def passages_of(text: str, tokenizer, tokens: int, passage: int) -> list[list[int]]:
    ids = tokenizer.encode(text)[:tokens]
    return [ids[i:i + passage] for i in range(0, len(ids), passage)]


def llama_cpp_env(sdist: Path) -> dict:
    """The environment in which `import llama_cpp` loads the sdist's sources over its natively built libllama
    (its Python dependencies installed once into .cache/llamacpp/pydeps)."""
    deps = ROOT / ".cache" / "llamacpp" / "pydeps"
    if not (deps / "diskcache").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(deps), "diskcache", "jinja2"],
                       check=True)
    return {**os.environ, "PYTHONPATH": f"{sdist}{os.pathsep}{deps}",
            "LLAMA_CPP_LIB_PATH": str((sdist / "vendor" / "llama.cpp" / "build" / "bin").resolve())}


def llama_cpp_logits(gguf: Path, sdist: Path, passages: list[list[int]]) -> np.ndarray:
    done = subprocess.run([sys.executable, "-c", LLAMA_SCRIPT, str(gguf)], input=json.dumps(passages).encode(),
                          capture_output=True, env=llama_cpp_env(sdist), check=True)
    return np.load(io.BytesIO(done.stdout))


def main() -> None:
    from nomoat.edge.fidelity import teacher_forced_logits
    from nomoat.edge.generate import Generator
    from nomoat.export.verify import compare, load_reference, reference_logits

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf", type=Path)
    ap.add_argument("folders", nargs="*", type=Path, help="nomoat exports of that file")
    ap.add_argument("--llama-cpp", type=Path, help="the llama-cpp-python sdist folder, its vendor/llama.cpp built")
    ap.add_argument("--text", type=Path, default=Path("/usr/share/common-licenses/GPL-3"))
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--passage", type=int, default=256)
    a = ap.parse_args()

    reference = load_reference(a.gguf)
    tokenizer = None
    results = {}
    for folder in a.folders:
        gen = Generator(folder, verify_files=False)
        tokenizer = tokenizer or gen.tokenizer
        passages = passages_of(a.text.read_text(), tokenizer, a.tokens, a.passage)
        results[f"nomoat {folder.name}"] = np.concatenate([teacher_forced_logits(gen, p) for p in passages])
        del gen
    if tokenizer is None:
        sys.exit("give at least one nomoat folder (its tokenizer cuts the text)")
    ref = np.concatenate([reference_logits(reference, p) for p in passages])
    if a.llama_cpp:
        results["llama.cpp"] = llama_cpp_logits(a.gguf, a.llama_cpp, passages)
    for name, logits in results.items():
        agree, kl, _ = compare(ref, logits)
        print(f"{a.gguf.name}  {name:32s} top-1 agreement {agree:.1%} over {len(ref)} tokens, mean KL {kl:.4f}",
              flush=True)


if __name__ == "__main__":
    main()
