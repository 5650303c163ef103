"""`python -m trainer` as a real subprocess: exit codes and the saved style."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "trainer", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_cli_trains_from_a_toml_config(tmp_path, image_folder):
    config = tmp_path / "style.toml"
    config.write_text('style_name = "cli-style"\npreset = "Quick"\nsteps = 5\nnum_samples = 0\n')
    result = _run("--config", config, "--images", image_folder, "--workspace", tmp_path / "ws")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "ws" / "styles" / "cli-style.safetensors").is_file()
    assert "saved cli-style" in result.stdout


def test_cli_print_config_shows_every_default():
    result = _run("--print-config", "--preset", "Quick", "--set", "style_name=x", "--set", "steps=7")
    assert result.returncode == 0
    config = json.loads(result.stdout)
    assert config["steps"] == 7 and config["rank"] == 8 and config["target_modules"] == ["to_q", "to_k", "to_v", "to_out.0"]


def test_cli_bad_input_exits_2_with_a_message(tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_text("not an image")
    result = _run("--set", "style_name=x", "--images", junk, "--workspace", tmp_path / "ws")
    assert result.returncode == 2 and "junk.png: not an image" in result.stderr
    result = _run("--set", "style_name=../x", "--images", junk)
    assert result.returncode == 2 and "not allowed" in result.stderr
