"""scripts/start.sh and scripts/setup.sh say what they do before each phase (issue 18, item 8: the first start
was silent for four minutes while pip installed). python3 and the venv's python are stand-ins that record how
they were called: what is under test is the scripts' own steps, not pip."""

from __future__ import annotations

import os
import shutil
import subprocess

from tests.running_app import ROOT

FAKE_PYTHON = """#!/bin/sh
echo "$*" >> "$CALLS"
"""
FAKE_PYTHON3 = """#!/bin/sh
echo "python3 $*" >> "$CALLS"
mkdir -p .venv/bin && cp "$FAKE_VENV_PYTHON" .venv/bin/python && chmod +x .venv/bin/python
"""


def _start(project, bin_dir, calls):
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls),
           "FAKE_VENV_PYTHON": str(bin_dir / "venv-python")}
    return subprocess.run(["bash", "scripts/start.sh", "--port", "7999"], cwd=project, env=env, capture_output=True,
                          text=True, timeout=30)


def test_start_says_what_it_does_before_each_phase(tmp_path):
    project, bin_dir, calls = tmp_path / "project", tmp_path / "bin", tmp_path / "calls.log"
    (project / "scripts").mkdir(parents=True)
    bin_dir.mkdir()
    for script in ("start.sh", "setup.sh"):
        shutil.copy(ROOT / "scripts" / script, project / "scripts" / script)
    (project / "requirements.txt").write_text("torch==2.13.0\n")
    (bin_dir / "python3").write_text(FAKE_PYTHON3)
    (bin_dir / "venv-python").write_text(FAKE_PYTHON)
    (bin_dir / "python3").chmod(0o755)

    first = _start(project, bin_dir, calls)
    assert first.returncode == 0, first.stderr
    lines = first.stderr.splitlines()
    assert [line.split("...")[0] for line in lines if line.endswith("...")] == [
        "[setup] Creating the virtual environment .venv (first start only)",
        "[setup] Installing the packages of requirements.txt into .venv: the first time takes several minutes "
        "(torch is large)",
        "[start] Starting Style Studio: loading the base model, then the address to open is printed",
    ]
    pip, app = calls.read_text().splitlines()[1:]
    assert " -q " not in f" {pip} " and "--progress-bar on" in pip  # the long install shows pip's progress
    assert app == "-m app --port 7999"

    again = _start(project, bin_dir, calls)  # installed already: a quiet check, said as such
    assert "[setup] Checking the installed packages against requirements.txt..." in again.stderr
    assert "Creating" not in again.stderr and "Installing" not in again.stderr
    assert " -q " in f" {calls.read_text().splitlines()[3]} "
