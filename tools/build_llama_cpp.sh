#!/usr/bin/env bash
# The native peer: llama.cpp as vendored by the llama-cpp-python 0.3.36 sdist, built for this CPU
# (-DGGML_NATIVE=ON) into .cache/llamacpp. Benchmarks and the llama-quantize test use it; nothing
# else needs it. ~20 min on 2 cores the first time; later runs only rebuild what changed.
#   tools/build_llama_cpp.sh [TARGET ...]    (default: the tools the benchmarks and tests run)
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.3.36
ROOT=.cache/llamacpp
SRC=$ROOT/llama_cpp_python-$VERSION/vendor/llama.cpp
PIP=${PIP:-$( [ -x .venv/bin/pip ] && echo .venv/bin/pip || echo pip3 )}
if [ ! -f "$SRC/CMakeLists.txt" ]; then
  mkdir -p "$ROOT"
  "$PIP" download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$ROOT"
  tar -xzf "$ROOT/llama_cpp_python-$VERSION.tar.gz" -C "$ROOT"
fi
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(llama-quantize llama-bench llama-cli llama-completion llama-lookup llama-speculative llama)
# llama-completion only exists in newer trees; keep the targets this tree has.
cmake -S "$SRC" -B "$SRC/build" -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=ON \
  -DCMAKE_BUILD_TYPE=Release >/dev/null
have=$(cmake --build "$SRC/build" --target help | awk '{print $2}')
keep=()
for t in "${TARGETS[@]}"; do grep -qx "$t" <<<"$have" && keep+=("$t") || echo "(no target $t in this tree)"; done
cmake --build "$SRC/build" -j"$(nproc)" --target "${keep[@]}"
echo "built: $SRC/build/bin"
