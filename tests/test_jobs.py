"""The job queue with real child processes: queueing, cancel/keep/discard, kill -9 and resume."""

from __future__ import annotations

import json
import os
import signal
import time

import torch
from safetensors.torch import load_file

from styles.library import StyleLibrary
from tests.conftest import pattern_image
from tests.running_app import start_app, stop_app
from trainer.config import make_config
from trainer.data import ImageSet, ingest
from trainer.events import Finished
from trainer.jobs import JobManager

TIMEOUT_S = 240


def _images(n=2):
    return ImageSet(images=[pattern_image(i) for i in range(n)], captions=["a red circle", None][:n], names=["a", "b"][:n])


def _wait_for(condition, timeout_s=TIMEOUT_S, what="condition"):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_two_queued_jobs_run_one_after_the_other(tmp_path):
    jobs = JobManager(tmp_path).start()
    first = jobs.submit(make_config("Quick", style_name="first", steps=6, num_samples=0), _images())
    second = jobs.submit(make_config("Quick", style_name="second", steps=6, num_samples=0), _images())
    assert jobs.position(second) in (1, 2)  # behind the first (which may not have left the queue yet)
    assert jobs.wait_idle(TIMEOUT_S)
    a, b = jobs.get(first), jobs.get(second)
    assert (a.state, b.state) == ("finished", "finished"), (a.message, b.message)
    assert a.ended <= b.started  # never two at once
    assert StyleLibrary(tmp_path).names() == ["first", "second"]
    assert len(jobs.progress(first).losses) == 6
    # The same name cannot be queued twice, nor one that is already a style.
    try:
        jobs.submit(make_config("Quick", style_name="first", steps=2), _images())
    except FileExistsError as err:
        assert "already exists" in str(err)
    else:
        raise AssertionError("a second job for an existing style was accepted")


def test_cancel_then_keep_or_discard_the_checkpoint(tmp_path):
    jobs = JobManager(tmp_path).start()
    cfg = dict(steps=100_000, num_samples=0, checkpoint_every=5)
    kept = jobs.submit(make_config("Quick", style_name="kept", **cfg), _images())
    _wait_for(lambda: jobs.get(kept).step >= 7, what="step 7")
    started = time.monotonic()
    jobs.cancel(kept)
    _wait_for(lambda: jobs.get(kept).state == "cancelled", what="cancelled")
    assert time.monotonic() - started < 10
    assert "can be kept" in jobs.get(kept).message and not StyleLibrary(tmp_path).exists("kept")
    assert jobs.keep(kept, "kept-as") == "kept-as"
    assert StyleLibrary(tmp_path).get("kept-as").config["style_name"] == "kept-as"

    dropped = jobs.submit(make_config("Quick", style_name="dropped", **cfg), _images())
    _wait_for(lambda: jobs.get(dropped).checkpoint_step >= 5, what="a checkpoint")
    jobs.cancel(dropped)
    _wait_for(lambda: jobs.get(dropped).state == "cancelled", what="cancelled")
    jobs.discard(dropped)
    assert jobs.get(dropped).state == "discarded" and not (tmp_path / "jobs" / dropped / "checkpoints").exists()
    assert not StyleLibrary(tmp_path).exists("dropped")


def test_killed_child_is_interrupted_and_resumes(tmp_path):
    jobs = JobManager(tmp_path).start()
    job = jobs.submit(make_config("Quick", style_name="phoenix", steps=40, num_samples=0, checkpoint_every=5), _images())
    _wait_for(lambda: jobs.get(job).checkpoint_step >= 10, what="a checkpoint at step 10")
    os.kill(jobs.get(job).pid, signal.SIGKILL)
    _wait_for(lambda: jobs.get(job).state == "interrupted", what="interrupted")
    assert "Resume continues from step" in jobs.get(job).message
    jobs.resume(job)
    assert jobs.wait_idle(TIMEOUT_S) and jobs.get(job).state == "finished", jobs.get(job).message
    assert StyleLibrary(tmp_path).exists("phoenix")
    assert not (tmp_path / "jobs" / job / "checkpoints").exists()  # a finished job's checkpoints are not left behind


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_kill_9_of_the_app_then_resume_gives_the_uninterrupted_adapter(tmp_path):
    """`python -m app` dies by SIGKILL mid-run; the next app lists the job as interrupted; Resume ends where a straight run ends."""
    from gradio_client import handle_file

    for i in range(2):
        pattern_image(i).save(tmp_path / f"upload{i}.png")
    (tmp_path / "upload0.txt").write_text("a red circle")
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    app, client, _ = start_app(workspace)
    job_file = workspace / "jobs" / "0001" / "job.json"
    try:
        files = [handle_file(str(tmp_path / name)) for name in ("upload0.png", "upload0.txt", "upload1.png")]
        job, _ = client.predict(files=files, style_name="survivor", preset="Quick", steps=60, checkpoint_every=5,
                                num_samples=0, api_name="/submit_training")
        assert job == "0001"
        _wait_for(lambda: json.loads(job_file.read_text())["checkpoint_step"] >= 15, what="a checkpoint at step 15")
        child = json.loads(job_file.read_text())["pid"]
    finally:
        app.kill()  # SIGKILL: no cleanup runs in the app
        app.wait()
    # The orphaned child notices within a second, saves a checkpoint and exits.
    _wait_for(lambda: _gone(child), timeout_s=60, what="the orphaned training process to exit")

    app, client, _ = start_app(workspace)  # "starting the app again"
    try:
        listed = {row["job"]: row for row in client.predict(api_name="/list_jobs")}
        assert listed["0001"]["state"] == "interrupted", listed
        assert "The app stopped while this job was running" in listed["0001"]["message"]
        client.predict(job_id="0001", api_name="/resume_job")
        status, _, _ = client.predict(job_id="0001", api_name="/follow_job")  # returns when the job has stopped
        assert "finished" in status, status
    finally:
        stop_app(app)

    # The same run without interruption, in this process, with the job's own config and kept images.
    from trainer.base import load_base
    from trainer.config import TrainConfig
    from trainer.train import train

    base = load_base()
    images = ingest(workspace / "jobs" / "0001" / "images", base.resolution)
    cfg = TrainConfig.from_dict(json.loads(job_file.read_text())["config"])
    straight = list(train(cfg, images, base, StyleLibrary(tmp_path / "straight")))[-1]
    assert isinstance(straight, Finished)
    expected, got = load_file(straight.path), load_file(StyleLibrary(workspace).path_for("survivor"))
    assert all(torch.allclose(expected[k], got[k], atol=1e-6) for k in expected)


def test_a_failing_child_reports_why(tmp_path):
    jobs = JobManager(tmp_path, model="/no/such/model").start()
    job = jobs.submit(make_config("Quick", style_name="nomodel", steps=2), _images())
    assert jobs.wait_idle(TIMEOUT_S)
    assert jobs.get(job).state == "failed" and "/no/such/model" in jobs.get(job).message
