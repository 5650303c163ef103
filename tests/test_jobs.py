"""The job queue with real child processes: queueing, cancel/keep/discard, kill -9 and resume."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

from core.threads import ALONE, BESIDE_TRAINING, TRAINING, torch_threads
from styles.library import StyleLibrary
from tests.conftest import pattern_image, save_style
from tests.running_app import start_app, stop_app
from trainer.config import make_config
from trainer.data import ImageSet, ingest
from trainer.events import Finished
from trainer.jobs import JobManager

TIMEOUT_S = 240


def _images(n=2):
    return ImageSet(images=[pattern_image(i) for i in range(n)], captions=["a red circle", None][:n],
                    names=["a", "b"][:n])


def _cfg(name, **settings):
    """A tiny job's settings: no validation and no captioner unless a test is about them (they cost more than
    the training)."""
    return make_config("Quick", style_name=name, **{"num_samples": 0, "validation_prompts": 0, "auto_caption": False,
                                                    **settings})


def _wait_for(condition, timeout_s=TIMEOUT_S, what="condition"):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.slow
def test_two_queued_jobs_run_one_after_the_other(tmp_path):
    jobs = JobManager(tmp_path).start()
    first = jobs.submit(_cfg("first", steps=6), _images())
    second = jobs.submit(_cfg("second", steps=6), _images())
    assert jobs.position(second) in (1, 2)  # behind the first (which may not have left the queue yet)
    assert jobs.wait_idle(TIMEOUT_S)
    a, b = jobs.get(first), jobs.get(second)
    assert (a.state, b.state) == ("finished", "finished"), (a.message, b.message)
    assert a.ended <= b.started  # never two at once
    assert StyleLibrary(tmp_path).names() == ["first", "second"]
    assert len(jobs.progress(first).losses) == 6
    # The same name cannot be queued twice, nor one that is already a style.
    try:
        jobs.submit(_cfg("first", steps=2), _images())
    except FileExistsError as err:
        assert "already exists" in str(err)
    else:
        raise AssertionError("a second job for an existing style was accepted")


@pytest.mark.slow
def test_cancel_then_keep_or_discard_the_checkpoint(tmp_path):
    jobs = JobManager(tmp_path).start()
    cfg = dict(steps=100_000, checkpoint_every=5)
    kept = jobs.submit(_cfg("kept", **cfg), _images())
    _wait_for(lambda: jobs.get(kept).step >= 7, what="step 7")
    started = time.monotonic()
    jobs.cancel(kept)
    _wait_for(lambda: jobs.get(kept).state == "cancelled", what="cancelled")
    assert time.monotonic() - started < 10
    assert "can be kept" in jobs.get(kept).message and not StyleLibrary(tmp_path).exists("kept")
    assert jobs.keep(kept, "kept-as") == "kept-as"
    assert StyleLibrary(tmp_path).get("kept-as").config["style_name"] == "kept-as"

    dropped = jobs.submit(_cfg("dropped", **cfg), _images())
    _wait_for(lambda: jobs.get(dropped).checkpoint_step >= 5, what="a checkpoint")
    jobs.cancel(dropped)
    _wait_for(lambda: jobs.get(dropped).state == "cancelled", what="cancelled")
    jobs.discard(dropped)
    assert jobs.get(dropped).state == "discarded" and not (tmp_path / "jobs" / dropped / "checkpoints").exists()
    assert not StyleLibrary(tmp_path).exists("dropped")


@pytest.mark.slow
def test_killed_child_is_interrupted_and_resumes(tmp_path):
    jobs = JobManager(tmp_path).start()
    job = jobs.submit(_cfg("phoenix", steps=40, checkpoint_every=5), _images())
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


@pytest.mark.slow
def test_kill_9_of_the_app_then_resume_gives_the_uninterrupted_adapter(tmp_path):
    """`python -m app` dies by SIGKILL mid-run; the next app lists the job as interrupted;
    Resume ends where a straight run ends."""
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
                                num_samples=0, validation_prompts=0, auto_caption=False, api_name="/submit_training")
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
        status, *_ = client.predict(job_id="0001", api_name="/follow_job")  # returns when the job has stopped
        assert "finished" in status, status
    finally:
        stop_app(app)

    # The same run without interruption, in this process, with the job's own config and kept images.
    from models.base import load_base
    from trainer.config import TrainConfig
    from trainer.train import train

    base = load_base()
    images = ingest(workspace / "jobs" / "0001" / "images", base.resolution)
    cfg = TrainConfig.from_dict(json.loads(job_file.read_text())["config"])
    threads = torch.get_num_threads()
    try:  # as many threads as the training process had: sums in another order may differ in the last bit
        torch.set_num_threads(torch_threads(TRAINING))
        straight = list(train(cfg, images, base))[-1]
    finally:
        torch.set_num_threads(threads)
    assert isinstance(straight, Finished)
    expected, got = (load_file(save_style(StyleLibrary(tmp_path / "straight"), straight)),
                     load_file(StyleLibrary(workspace).path_for("survivor")))
    assert all(torch.allclose(expected[k], got[k], atol=1e-6) for k in expected)


@pytest.mark.slow
def test_a_failing_child_reports_why(tmp_path):
    jobs = JobManager(tmp_path, model="/no/such/model").start()
    job = jobs.submit(_cfg("nomodel", steps=2), _images())
    assert jobs.wait_idle(TIMEOUT_S)
    assert jobs.get(job).state == "failed" and "/no/such/model" in jobs.get(job).message


def _record(job_dir, **fields):
    """A job.json as another version of the app might have left it."""
    job_dir.mkdir(parents=True)
    record = {"id": job_dir.name, "style_name": f"s{job_dir.name}",
              "config": make_config("Quick", style_name=f"s{job_dir.name}").to_dict(),
              "model": None, "state": "queued", **fields}
    (job_dir / "job.json").write_text(json.dumps(record))
    return record


def test_records_this_version_cannot_use_are_listed_as_failed_and_left_as_they_are(tmp_path):
    jobs_dir = tmp_path / "jobs"
    newer = _record(jobs_dir / "0001", priority=3)  # a field this JobRecord does not know
    _record(jobs_dir / "0002", state="paused")  # a state this version does not know
    _record(jobs_dir / "0003", config={"style_name": "x", "future_setting": 1})  # a setting TrainConfig does not know
    _record(jobs_dir / "0004")  # a record this version reads: it was queued, so it is interrupted now
    (jobs_dir / "0005").mkdir()
    (jobs_dir / "0005" / "job.json").write_text("{not json")  # not a record at all: left alone, unlisted
    jobs = JobManager(tmp_path)
    assert [r.id for r in jobs.jobs()] == ["0004", "0003", "0002", "0001"]
    for job_id, words in (("0001", "priority"), ("0002", "'paused'"), ("0003", "future_setting")):
        record = jobs.get(job_id)
        assert record.state == "failed" and words in record.message and "cannot run it" in record.message
        with pytest.raises(ValueError, match="leaves it as it is"):
            jobs.resume(job_id)
    assert json.loads((jobs_dir / "0001" / "job.json").read_text()) == newer  # nothing in it was lost
    assert jobs.get("0004").state == "interrupted"
    # 0005's folder is not reused
    assert jobs.submit(_cfg("next", steps=1), _images()) == "0006"


@pytest.mark.slow
def test_a_job_that_cannot_be_built_or_written_fails_and_the_next_job_runs(tmp_path, monkeypatch):
    """The two faults that used to kill the worker thread for good: a record whose settings this code
    cannot read, and a workspace that refuses a write as a job starts."""
    import trainer.jobs

    jobs = JobManager(tmp_path)
    unreadable = jobs.submit(_cfg("unreadable", steps=2), _images())
    jobs.get(unreadable).config["future_setting"] = 1  # as a record from a newer version reads
    unwritable = jobs.submit(_cfg("unwritable", steps=2), _images())
    fine = jobs.submit(_cfg("fine", steps=2), _images())

    real_write, refused = trainer.jobs.write_text_atomic, []

    def full_disk_once(path, text):
        if f'"id": "{unwritable}"' in text and '"running"' in text and not refused:
            refused.append(path)
            raise OSError(28, "No space left on device")
        return real_write(path, text)

    monkeypatch.setattr(trainer.jobs, "write_text_atomic", full_disk_once)
    jobs.start()
    assert jobs.wait_idle(TIMEOUT_S)
    assert (jobs.get(unreadable).state == "failed"
            and "Unknown training settings: future_setting" in jobs.get(unreadable).message)
    assert (refused and jobs.get(unwritable).state == "failed"
            and "No space left on device" in jobs.get(unwritable).message)
    assert jobs.get(fine).state == "finished", jobs.get(fine).message
    assert StyleLibrary(tmp_path).names() == ["fine"]
    # the next write went through
    assert json.loads((tmp_path / "jobs" / unwritable / "job.json").read_text())["state"] == "failed"
    later = jobs.submit(_cfg("later", steps=1), _images())
    assert jobs.wait_idle(TIMEOUT_S) and jobs.get(later).state == "finished"  # the worker is still there


def test_a_job_state_moves_only_along_the_table():
    from trainer.jobs import ACTIVE, MOVES, JobState

    assert set(MOVES) == set(JobState)
    assert all(JobState.QUEUED not in MOVES[state]
               for state in (JobState.RUNNING, JobState.FINISHED, JobState.DISCARDED))
    assert all(MOVES[state] <= {JobState.DISCARDED} for state in (JobState.FINISHED, JobState.DISCARDED))
    assert set(ACTIVE) == {JobState.QUEUED, JobState.RUNNING}


# -- issue 18 -------------------------------------------------------------------------------------
def test_threads_are_sized_from_the_cores_and_the_setting_wins(capsys):
    from app.__main__ import main

    assert torch_threads(ALONE, cores=2, environ={}) == 2
    assert torch_threads(TRAINING, cores=2, environ={}) == 1  # one core left to the app's server and generation
    assert torch_threads(BESIDE_TRAINING, cores=2, environ={}) == 1
    assert torch_threads(TRAINING, cores=1, environ={}) == 1
    assert torch_threads(TRAINING, cores=16, environ={}) == 15
    assert torch_threads(TRAINING, cores=16, environ={"OMP_NUM_THREADS": "4"}) == 4  # pinned by the environment
    assert torch_threads(BESIDE_TRAINING, setting=3, cores=16, environ={"OMP_NUM_THREADS": "4"}) == 3  # --threads
    with pytest.raises(SystemExit) as exited:
        main(["--threads", "0"])
    assert exited.value.code == 2 and "--threads: must be a whole number of threads" in capsys.readouterr().err


def test_the_time_left_is_smoothed():
    """A step time that wobbles (a busy machine) or spikes once must not swing the estimate (47 -> 93 minutes)."""
    from trainer.pace import Pace

    pace, estimates = Pace(), []
    times = [4.0] + [0.25, 0.35] * 50  # a warm-up step, then a wobble of +-17% around 0.3 s
    times[60] = 1.5  # one slow step
    for done, seconds in enumerate(times, start=1):
        pace.add(seconds)
        estimates.append(pace.seconds_left(1000 - done))
    later = estimates[10:]
    assert max(b / a for a, b in zip(later, later[1:])) < 1.15  # never more than 15% up from one step to the next
    assert abs(pace.it_per_s - 1 / 0.3) < 0.4
    for _ in range(40):  # the machine gets busier for good: the estimate follows
        pace.add(0.6)
    assert abs(pace.it_per_s - 1 / 0.6) < 0.1
    # A validation between two steps (here 14 s after 140 steps) is counted in the time left, spread over the
    # steps: 0.1 s more per step, without a jump in the step time.
    before = pace.seconds_left(100)
    pace.add(0.6, between=14.0)
    assert abs(pace.seconds_left(100) - before - 100 * 14.0 / (len(times) + 41 - 2)) < 1.0
    assert abs(pace.it_per_s - 1 / 0.6) < 0.1


@pytest.mark.slow
def test_a_jobs_name_is_reserved_and_its_work_kept_when_taken(tmp_path):
    """Import and rename may not take a queued or running job's name; if it is taken anyway (a file copied
    in), the job saves its style under a free name and says so. The child trains with the threads setting,
    and generation in the app process sizes its threads too."""
    from app.studio import Studio
    from tests.conftest import train_style

    train_style(StyleLibrary(tmp_path), "other", seed=1, steps=1)
    threads_before = torch.get_num_threads()
    studio = Studio(tmp_path, threads=1)  # one: more on a busy 2-core machine would slow this test down
    try:
        jobs = studio.jobs
        job = jobs.submit(_cfg("ink", steps=60, checkpoint_every=100), _images())
        _wait_for(lambda: jobs.get(job).step >= 1, what="the first step")
        assert jobs.progress(job).threads == 1  # the child applied the setting
        exported = studio.export("other", "diffusers")
        for refused in (lambda: studio.import_style(exported, "ink"), lambda: studio.rename("other", "ink")):
            with pytest.raises(ValueError, match=f"Job {job} .*'ink'"):
                refused()
        with pytest.raises(ValueError, match=f"Job {job}"):
            jobs.submit(_cfg("ink", steps=1), _images())
        assert studio.example("ink")[1] == "ink-2"  # Train this example picks a free name
        StyleLibrary(tmp_path).save("ink", exported.read_bytes())  # taken anyway, behind the app's back
        assert jobs.get(job).state == "running"

        torch.set_num_threads(2)
        studio.generate("a red circle", steps=2)
        assert torch.get_num_threads() == 1  # the setting, in this process too

        assert jobs.wait_idle(TIMEOUT_S)
        record = jobs.get(job)
        assert record.state == "finished", record.message
        assert "'ink-2'" in record.message and StyleLibrary(tmp_path).get("ink-2").steps_done == 60
    finally:
        studio.close()
        torch.set_num_threads(threads_before)


@pytest.mark.slow
def test_cancel_while_the_training_process_starts_is_a_clean_cancel(tmp_path):
    jobs = JobManager(tmp_path).start()
    job = jobs.submit(_cfg("early", steps=1000), _images())
    _wait_for(lambda: jobs.get(job).state == "running", what="running")
    assert jobs.get(job).message == "Starting…"  # the child is still starting (imports, model): no event yet
    asked = time.monotonic()
    jobs.cancel(job)
    _wait_for(lambda: jobs.get(job).state != "running", timeout_s=30, what="the job to stop")
    record = jobs.get(job)
    assert record.state == "cancelled", record.message
    assert time.monotonic() - asked < 5  # nothing was trained yet: no grace period to wait out
    assert record.message == "Cancelled as its training process started. Nothing to keep."


@pytest.mark.slow
def test_a_style_that_cannot_be_saved_fails_its_job_with_the_reason_and_the_queue_goes_on(tmp_path):
    """The workspace refuses the write that ends a job: that job fails saying why and what to do, the
    next job runs, and once the disk is writable again the failed job resumes to a style."""
    blocked_path = StyleLibrary(tmp_path).path_for("blocked")
    blocked_path.mkdir()  # the style file cannot be written where a folder stands
    jobs = JobManager(tmp_path).start()
    blocked = jobs.submit(_cfg("blocked", steps=4, checkpoint_every=2), _images())
    after = jobs.submit(_cfg("after", steps=1), _images())
    assert jobs.wait_idle(TIMEOUT_S)
    record = jobs.get(blocked)
    assert record.state == "failed" and "could not be saved" in record.message, record.message
    assert str(blocked_path) in record.message and "press Resume" in record.message
    assert jobs.get(after).state == "finished", jobs.get(after).message
    blocked_path.rmdir()
    jobs.resume(blocked)
    assert jobs.wait_idle(TIMEOUT_S) and jobs.get(blocked).state == "finished", jobs.get(blocked).message


def test_a_refused_write_reaches_the_user_with_its_reason():
    """Not gradio's generic "upstream exception": the user reads what went wrong and what to do."""
    import gradio as gr

    from app.handlers import user_errors

    @user_errors
    def resume_job(job_id):
        raise PermissionError(13, "Permission denied", "/srv/workspace/jobs/0001/job.json")

    with pytest.raises(gr.Error) as caught:
        resume_job("0001")
    assert "Permission denied" in caught.value.message and "/srv/workspace/jobs/0001/job.json" in caught.value.message
    assert "writable" in caught.value.message


@pytest.mark.slow
def test_sigterm_stops_the_app_and_its_training_process_with_a_checkpoint(tmp_path):
    """A service stop (SIGTERM) of `python -m app` mid-run: the training process stops with a checkpoint
    within the bound, nothing is orphaned, and the next start can resume from that step."""
    from gradio_client import handle_file

    pattern_image(0).save(tmp_path / "upload0.png")
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    app, client, _ = start_app(workspace, ["--threads", "1"])
    try:
        client.predict(files=[handle_file(str(tmp_path / "upload0.png"))], style_name="stopped", preset="Quick",
                       steps=100_000, checkpoint_every=100_000, num_samples=0, validation_prompts=0,
                       auto_caption=False, api_name="/submit_training")
        _wait_for(lambda: int(client.predict(api_name="/list_jobs")[0]["step"].split("/")[0]) >= 3, what="step 3")
        child = json.loads((workspace / "jobs" / "0001" / "job.json").read_text())["pid"]
        app.send_signal(signal.SIGTERM)
        assert app.wait(timeout=45) == 0
    finally:
        if app.poll() is None:
            app.kill()
    assert _gone(child)
    from trainer.checkpoints import CheckpointDir

    step, _ = CheckpointDir(workspace / "jobs" / "0001" / "checkpoints").latest_progress()
    assert step >= 3  # the stop wrote it: the periodic ones never came
    jobs = JobManager(workspace)  # the next start
    record = jobs.get("0001")
    assert record.state == "interrupted" and record.checkpoint_step == step, record.message
    assert f"Resume continues from step {step}" in record.message
    jobs.resume("0001")
