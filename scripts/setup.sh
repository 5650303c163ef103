#!/usr/bin/env bash
# Create .venv and install the pinned dependencies (idempotent; fast when already installed).
# Each phase says what it does first: the first install takes minutes (torch alone is hundreds of MB),
# and a silent terminal for that long looks hung (issue 18, item 8).
set -euo pipefail
cd "$(dirname "$0")/.."
requirements="${1:-requirements.txt}"
say() { echo "[setup] $*" >&2; }
if [ ! -x .venv/bin/python ]; then
  say "Creating the virtual environment .venv (first start only)..."
  python3 -m venv .venv
fi
# A stamp of the requirements last installed: when it matches, pip only checks (a few seconds, quietly);
# otherwise pip shows what it downloads and installs.
stamp=".venv/.installed-$(basename "$requirements")"
wanted="$(cksum < "$requirements")"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
  say "Checking the installed packages against $requirements..."
  .venv/bin/python -m pip install -q --disable-pip-version-check -r "$requirements"
else
  say "Installing the packages of $requirements into .venv: the first time takes several minutes (torch is large)..."
  .venv/bin/python -m pip install --disable-pip-version-check --progress-bar on -r "$requirements"
  echo "$wanted" > "$stamp"
  say "Packages installed."
fi
