#!/usr/bin/env bash
# The test command: set up .venv, lint, then the whole pytest suite (slow SmolLM2 test included).
set -euo pipefail
cd "$(dirname "$0")/.."
./tools/setup.sh
.venv/bin/ruff check nomoat edge export tests tools
exec .venv/bin/python -m pytest -q "$@"
