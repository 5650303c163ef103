#!/usr/bin/env bash
# Set up and start the app on the embedded default model: http://127.0.0.1:7860
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh requirements.txt
echo "[start] Starting Style Studio: loading the base model, then the address to open is printed..." >&2
HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False exec .venv/bin/python -m app "$@"
