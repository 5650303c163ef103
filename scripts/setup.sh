#!/usr/bin/env bash
# Create .venv and install the pinned dependencies (idempotent; fast when already installed).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r "${1:-requirements.txt}"
