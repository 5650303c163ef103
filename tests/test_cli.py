"""`python -m trainer` as a real subprocess: exit codes and the saved style."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from styles.library import StyleLibrary

ROOT = Path(__file__).resolve().parent.parent


def _run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "trainer", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_cli_trains_from_a_toml_config(tmp_path, image_folder):
    config = tmp_path / "style.toml"
    config.write_text('style_name = "cli-style"\npreset = "Quick"\nsteps = 5\nnum_samples = 0\n'
                      'validation_prompts = 0\n')
    result = _run("--config", config, "--images", image_folder, "--workspace", tmp_path / "ws", "--threads", 1)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "ws" / "styles" / "cli-style.safetensors").is_file()
    assert "saved cli-style" in result.stdout


def test_cli_print_config_shows_every_default():
    result = _run("--print-config", "--preset", "Quick", "--set", "style_name=x", "--set", "steps=7")
    assert result.returncode == 0
    config = json.loads(result.stdout)
    assert (config["steps"] == 7 and config["rank"] == 8
            and config["target_modules"] == ["to_q", "to_k", "to_v", "to_out.0"])


def test_cli_bad_input_exits_2_with_a_message(tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_text("not an image")
    result = _run("--set", "style_name=x", "--images", junk, "--workspace", tmp_path / "ws")
    assert result.returncode == 2 and "junk.png: not an image" in result.stderr
    result = _run("--set", "style_name=../x", "--images", junk)
    assert result.returncode == 2 and "not allowed" in result.stderr
    result = _run("--set", "style_name=x", "--images", junk, "--threads", 0)
    assert result.returncode == 2 and "--threads must be 1 or more" in result.stderr


@pytest.mark.slow
def test_ctrl_c_keeps_a_checkpoint_and_resume_finishes(tmp_path, image_folder):
    args = ["--preset", "Quick", "--set", "style_name=later", "--set", "steps=100000", "--set", "checkpoint_every=5",
            "--set", "num_samples=0", "--set", "validation_prompts=0", "--images", image_folder,
            "--workspace", tmp_path / "ws"]
    run = subprocess.Popen([sys.executable, "-m", "trainer", *map(str, args)], cwd=ROOT, stderr=subprocess.PIPE,
                           text=True)
    checkpoints = tmp_path / "ws" / "runs" / "later" / "checkpoints"
    deadline = time.monotonic() + 120
    while not list(checkpoints.glob("step-*.safetensors")):
        assert time.monotonic() < deadline and run.poll() is None, "no checkpoint appeared"
        time.sleep(0.2)
    run.send_signal(signal.SIGINT)
    _, stderr = run.communicate(timeout=60)
    assert run.returncode == 1 and "--resume" in stderr, stderr
    again = _run(*args)  # without --resume: refused, nothing lost
    assert again.returncode == 2 and "add --resume" in again.stderr
    shorter = [a if a != "steps=100000" else "steps=30" for a in args]
    resumed = _run(*shorter, "--resume")
    assert resumed.returncode == 0 and "resuming at step" in resumed.stderr, resumed.stderr
    assert (tmp_path / "ws" / "styles" / "later.safetensors").is_file()


LAUNCH_2 = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "trainer"]


@pytest.mark.slow
def test_accelerate_launch_trains_one_style_over_two_processes(tmp_path, image_folder):
    """Data parallel on two CPU processes (gloo): one style is saved, and it differs from a one-process run;
    Ctrl-C and --resume over two processes end with the uninterrupted two-process adapter."""
    # The last step's weights are compared: the interrupted run validates more often than the reference run
    # (checkpoint_every differs), so a best-validation choice could differ without anything being wrong.
    common = ["--preset", "Quick", "--set", "num_samples=0", "--set", "learning_rate=1e-3", "--set", "style_name=dp",
              "--set", "validation_prompts=0", "--set", "keep=last", "--images", str(image_folder)]
    result = subprocess.run([*LAUNCH_2, *common, "--set", "steps=40", "--workspace", str(tmp_path / "dp")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("saved dp") == 1
    library = StyleLibrary(tmp_path / "dp")
    assert library.names() == ["dp"] and library.get("dp").config["steps"] == 40
    from core.files import read_safetensors_header
    from styles.metadata import style_info

    metadata, _ = read_safetensors_header(library.path_for("dp"))
    assert style_info(metadata)["processes"] == "2"
    single = _run(*common, "--set", "steps=40", "--workspace", tmp_path / "one")
    assert single.returncode == 0, single.stderr
    two, one = load_file(library.path_for("dp")), load_file(StyleLibrary(tmp_path / "one").path_for("dp"))
    assert not all(torch.allclose(two[k], one[k]) for k in one)  # the second process's batches counted

    # Ctrl-C in the terminal signals the whole process group: the launcher and both workers.
    interrupted = subprocess.Popen([*LAUNCH_2, *common, "--set", "steps=100000", "--set", "checkpoint_every=2",
                                    "--workspace", str(tmp_path / "resumed")],
                                   cwd=ROOT, stderr=subprocess.PIPE, text=True, start_new_session=True)
    checkpoints = tmp_path / "resumed" / "runs" / "dp" / "checkpoints"
    deadline = time.monotonic() + 120
    while not list(checkpoints.glob("step-*.safetensors")):
        assert time.monotonic() < deadline and interrupted.poll() is None, "no checkpoint appeared"
        time.sleep(0.05)
    os.killpg(interrupted.pid, signal.SIGINT)
    _, stderr = interrupted.communicate(timeout=120)
    assert interrupted.returncode != 0 and "--resume" in stderr, stderr[-3000:]
    stopped_at = max(int(p.stem.split("-")[1]) for p in checkpoints.glob("step-*.safetensors"))
    assert stopped_at < 40
    resumed = subprocess.run([*LAUNCH_2, *common, "--set", "steps=40", "--workspace", str(tmp_path / "resumed"),
                              "--resume"],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and f"resuming at step {stopped_at}" in resumed.stderr, resumed.stderr[-3000:]
    again = load_file(StyleLibrary(tmp_path / "resumed").path_for("dp"))
    assert all(torch.allclose(two[k], again[k], atol=1e-6) for k in two)
