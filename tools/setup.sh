#!/usr/bin/env bash
# Create .venv with nomoat and its host + dev extras (torch 2.13.0 CPU build).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[export,dev]'
