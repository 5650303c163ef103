"""Training jobs: a queue on disk, one child process at a time, checkpoints, cancel and resume.

    workspace/jobs/<id>/job.json                 the record: config, state, step, message (written atomically)
    workspace/jobs/<id>/images/0000.png (+ .txt)  the training set as it was accepted
    workspace/jobs/<id>/checkpoints/              trainer/checkpoints.py
    workspace/jobs/<id>/samples/                  sample images, as they arrive

Every job is a record on disk first, so nothing is lost when the app or the child dies: on start,
JobManager marks jobs that were queued or running as interrupted, and Resume continues them from
their last checkpoint. Training itself runs in a child process (a fresh interpreter), so a crash
or an out-of-memory error there never takes the web server down.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import queue
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from core.files import staged_folder, write_text_atomic
from styles.library import StyleLibrary
from trainer.config import TrainConfig
from trainer.data import ImageSet
from trainer.events import TERMINAL, Cancelled, Checkpoint, Event, Failed, Finished, Sample, Started, Step

CANCEL_GRACE_S = 15.0  # a child that ignores the stop flag this long is terminated
PARENT_CHECK_S = 1.0
ACTIVE = ("queued", "running")
RESUMABLE = ("interrupted", "cancelled", "failed")


@dataclass
class JobRecord:
    id: str
    style_name: str
    config: dict
    model: str | None
    state: str = "queued"  # queued | running | finished | failed | cancelled | interrupted | discarded
    created: float = field(default_factory=time.time)
    queued_at: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    step: int = 0
    total_steps: int = 0
    checkpoint_step: int = 0
    message: str = ""
    skipped: list[str] = field(default_factory=list)
    style_path: str | None = None
    resume: bool = False  # the next run continues from the newest checkpoint
    pid: int | None = None  # the training process, while running


@dataclass
class Progress:
    """What the UI shows about a job while it runs (kept in memory, rebuilt from disk after a restart)."""

    losses: list[float] = field(default_factory=list)
    it_per_s: float = 0.0
    eta_s: float = 0.0
    samples: list[tuple[str, str]] = field(default_factory=list)  # (png path, prompt) of the newest samples


class TrainingJob:
    """One training run in a child process, reading its images from `job_dir`.

    >>> job = TrainingJob(cfg, model=None, workspace="ws", job_dir="ws/jobs/0001").start()  # doctest: +SKIP
    >>> for event in job.events(): print(event)                                              # doctest: +SKIP
    """

    def __init__(self, cfg: TrainConfig, model: str | None, workspace: str | Path, job_dir: str | Path, resume: bool = False,
                 model_config: str | None = None):
        cfg.validate()
        context = mp.get_context("spawn")  # a fresh interpreter: no state shared with the web server
        self._events = context.Queue()
        self._stop = context.Event()
        self._process = context.Process(
            target=_run,
            args=(cfg.to_dict(), model, model_config, str(workspace), str(job_dir), resume, self._events, self._stop, os.getpid()),
            daemon=True,
        )

    def start(self) -> "TrainingJob":
        self._process.start()
        return self

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def events(self, poll_s: float = 0.25) -> Iterator[Event]:
        """Yield the child's events until a terminal one; a child that dies silently ends the stream.

        Returns without a terminal event when the child died (killed, crashed): the caller decides.
        """
        stop_requested_at = None
        while True:
            try:
                event = self._events.get(timeout=poll_s)
            except queue.Empty:
                if self._stop.is_set():  # cancel asked: give the child its grace time, then terminate it
                    stop_requested_at = stop_requested_at or time.monotonic()
                    if time.monotonic() - stop_requested_at > CANCEL_GRACE_S and self._process.is_alive():
                        self._process.terminate()
                if self._process.is_alive():
                    continue
                try:  # the child may have sent its last event just before exiting
                    event = self._events.get(timeout=1.0)
                except queue.Empty:
                    return
            yield event
            if isinstance(event, TERMINAL):
                self._process.join(timeout=CANCEL_GRACE_S)
                return

    def cancel(self) -> None:
        """Ask the loop to stop between steps (it saves a checkpoint first); events() enforces the grace time."""
        self._stop.set()

    @property
    def exitcode(self) -> int | None:
        return self._process.exitcode


def _run(cfg_dict, model, model_config, workspace, job_dir, resume, events, stop, parent_pid) -> None:
    """Child process body: every outcome, including an exception, ends as an event."""
    _stop_when_orphaned(parent_pid, stop)
    try:
        from styles.library import StyleLibrary
        from trainer.base import load_base
        from trainer.checkpoints import CheckpointDir
        from trainer.data import ingest
        from trainer.train import train

        cfg = TrainConfig.from_dict(cfg_dict)
        base = load_base(model, cfg.precision, model_config)
        images = ingest(Path(job_dir) / "images", cfg.resolution or base.resolution)
        checkpoints = CheckpointDir(Path(job_dir) / "checkpoints", cfg.keep_checkpoints)
        log_dir = Path(job_dir) / "logs"  # TensorBoard, when installed: tensorboard --logdir workspace/jobs
        for event in train(cfg, images, base, StyleLibrary(workspace), stop, checkpoints=checkpoints, resume=resume, log_dir=log_dir):
            events.put(event)
    except Exception as err:  # reported to the parent, never swallowed
        events.put(Failed(f"Training failed: {type(err).__name__}: {err}"))


def _stop_when_orphaned(parent_pid: int, stop) -> None:
    """If the app dies (even by kill -9), stop at the next step: a checkpoint is saved, nothing runs on unseen."""

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(PARENT_CHECK_S)
        stop.set()

    threading.Thread(target=watch, daemon=True).start()


class JobManager:
    """The job queue of one workspace: submit, follow, cancel, resume, keep or discard.

    >>> jobs = JobManager("workspace").start()      # doctest: +SKIP
    >>> job_id = jobs.submit(cfg, images)            # doctest: +SKIP
    >>> for record, progress in jobs.follow(job_id): ...  # doctest: +SKIP
    """

    def __init__(self, workspace: str | Path, model: str | None = None, model_config: str | None = None):
        self.workspace = Path(workspace)
        self.root = self.workspace / "jobs"
        self.root.mkdir(parents=True, exist_ok=True)
        self.model, self.model_config = model, model_config  # model_config: configs for a single-file model
        self.library = StyleLibrary(self.workspace)
        self._lock = threading.Condition()
        self._records: dict[str, JobRecord] = {}
        self._progress: dict[str, Progress] = {}
        self._running: TrainingJob | None = None
        self._running_id: str | None = None
        self._worker: threading.Thread | None = None
        self._recover()

    # -- life cycle -----------------------------------------------------------------------
    def start(self) -> "JobManager":
        """Start the worker thread that runs queued jobs one after the other."""
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name="style-studio-jobs", daemon=True)
            self._worker.start()
        return self

    def _recover(self) -> None:
        """Read every job record; those the last app left queued or running become interrupted."""
        for path in sorted(self.root.glob("*/job.json")):
            try:
                record = JobRecord(**json.loads(path.read_text()))
            except (ValueError, TypeError, OSError):
                continue  # a foreign or damaged folder: leave it alone
            progress = Progress()
            from trainer.checkpoints import CheckpointDir  # torch: only when there is a job to recover

            # The header alone (step, losses): start-up never loads weights or optimizer moments.
            latest = CheckpointDir(self._dir(record.id) / "checkpoints").latest_progress()
            if latest:
                record.checkpoint_step, progress.losses = latest
            if record.state in ACTIVE:
                record.message = f"The app stopped while this job was {record.state}. {_resume_point(record)}"
                record.state = "interrupted"
                self._write(record)
            self._records[record.id] = record
            self._progress[record.id] = progress

    # -- actions --------------------------------------------------------------------------
    def submit(self, cfg: TrainConfig, images: ImageSet) -> str:
        """Queue a training job; its images are copied into the job's folder. Returns the job id."""
        cfg.validate()
        with self._lock:
            self.library.ensure_free(cfg.style_name)
            for other in self._records.values():
                if other.style_name == cfg.style_name and other.state in ACTIVE:
                    raise ValueError(f"A job for a style named {cfg.style_name!r} is already {other.state}; pick another name.")
            job_id = f"{max([int(i) for i in self._records] + [0]) + 1:04d}"
            with staged_folder(self._dir(job_id)) as folder:  # a job folder appears whole or not at all
                _write_images(folder / "images", images)
            record = JobRecord(job_id, cfg.style_name, cfg.to_dict(), self.model, total_steps=cfg.steps,
                               skipped=images.skipped_lines())
            self._records[job_id], self._progress[job_id] = record, Progress()
            self._write(record)
            self._lock.notify_all()
        return job_id

    def cancel(self, job_id: str) -> str:
        """Cancel a queued job at once, or ask a running one to stop (it keeps a checkpoint)."""
        with self._lock:
            record = self.get(job_id)
            if record.state == "queued":
                self._end(record, "cancelled", "Cancelled before it started.")
            elif record.state == "running" and self._running_id == job_id and self._running:
                self._running.cancel()
                record.message = "Stopping after the current step…"
            else:
                raise ValueError(f"Job {job_id} is {record.state}; only queued or running jobs can be cancelled.")
            return record.message

    def resume(self, job_id: str) -> None:
        """Queue an interrupted, cancelled or failed job again; it continues from its newest checkpoint."""
        with self._lock:
            record = self.get(job_id)
            if record.state not in RESUMABLE:
                raise ValueError(f"Job {job_id} is {record.state}; only {', '.join(RESUMABLE)} jobs can be resumed.")
            self.library.ensure_free(record.style_name)
            record.state, record.resume, record.queued_at, record.message = "queued", True, time.time(), "Queued to resume."
            self._write(record)
            self._lock.notify_all()

    def keep(self, job_id: str, style_name: str | None = None) -> str:
        """Save the newest checkpoint of a stopped job as a style; returns the style's name."""
        from trainer.checkpoints import CheckpointDir
        from trainer.train import keep_checkpoint

        with self._lock:
            record = self.get(job_id)
            if record.state not in RESUMABLE:
                raise ValueError(f"Job {job_id} is {record.state}; only a stopped job's checkpoint can be kept.")
            state, _ = CheckpointDir(self._dir(job_id) / "checkpoints").load_latest()
            if state is None:
                raise ValueError(f"Job {job_id} has no checkpoint to keep (it stopped before the first one).")
            name = style_name or record.style_name
            thumbnail = self._thumbnail(job_id)
            path = keep_checkpoint(state, self.library, name, thumbnail)
            record.style_path = str(path)
            self._end(record, "finished", f"Kept the checkpoint at step {state.step} as style {name!r}.")
            shutil.rmtree(self._dir(job_id) / "checkpoints", ignore_errors=True)
            return name

    def discard(self, job_id: str) -> None:
        """Delete a stopped job's checkpoints and images; its record stays in the history."""
        with self._lock:
            record = self.get(job_id)
            if record.state in ACTIVE:
                raise ValueError(f"Job {job_id} is {record.state}; cancel it first.")
            for part in ("checkpoints", "images"):
                shutil.rmtree(self._dir(job_id) / part, ignore_errors=True)
            self._end(record, "discarded", "Checkpoints and images deleted.")

    # -- reading --------------------------------------------------------------------------
    def get(self, job_id: str) -> JobRecord:
        record = self._records.get(str(job_id))
        if record is None:
            raise ValueError(f"No job {job_id!r}. Jobs: {', '.join(self._records) or 'none yet'}.")
        return record

    def progress(self, job_id: str) -> Progress:
        self.get(job_id)
        return self._progress[job_id]

    def jobs(self) -> list[JobRecord]:
        """Every job, newest first."""
        with self._lock:
            return sorted(self._records.values(), key=lambda r: r.id, reverse=True)

    def position(self, job_id: str) -> int:
        """1 for the next queued job, 2 for the one after, ...; 0 when not queued."""
        with self._lock:
            queued = sorted((r for r in self._records.values() if r.state == "queued"), key=lambda r: (r.queued_at, r.id))
            return next((i + 1 for i, r in enumerate(queued) if r.id == job_id), 0)

    def follow(self, job_id: str, poll_s: float = 0.5) -> Iterator[JobRecord]:
        """Yield the record whenever it changes, until the job is no longer queued or running."""
        last = None
        while True:
            record = self.get(job_id)
            snapshot = (record.state, record.step, record.message, len(self._progress[job_id].samples))
            if snapshot != last:
                last = snapshot
                yield record
            if record.state not in ACTIVE:
                return
            with self._lock:
                self._lock.wait(timeout=poll_s)

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until no job is queued or running (for tests and the CLI)."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while any(r.state in ACTIVE for r in self._records.values()):
                if not self._lock.wait(timeout=max(0.0, deadline - time.monotonic())) and time.monotonic() > deadline:
                    return False
        return True

    # -- the worker -----------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._lock:
                queued = sorted((r for r in self._records.values() if r.state == "queued"), key=lambda r: (r.queued_at, r.id))
                if not queued:
                    self._lock.wait(timeout=1.0)
                    continue
                record = queued[0]
                record.state, record.started, record.message = "running", time.time(), "Starting…"
                self._write(record)
                job = TrainingJob(TrainConfig.from_dict(record.config), record.model, self.workspace, self._dir(record.id), record.resume,
                                  self.model_config)
                self._running, self._running_id = job, record.id
            try:
                job.start()
                record.pid = job.pid
                self._consume(record, job)
            except Exception as err:  # the queue must keep going whatever one job does
                with self._lock:
                    self._end(record, "failed", f"The job could not run: {type(err).__name__}: {err}")
            finally:
                with self._lock:
                    self._running = self._running_id = None
                    self._lock.notify_all()

    def _consume(self, record: JobRecord, job: TrainingJob) -> None:
        progress = self._progress[record.id]
        for event in job.events():
            with self._lock:
                if isinstance(event, Started):
                    progress.losses, record.step = list(event.losses), event.resumed_from
                    notes = event.notes + ([f"Resumed from step {event.resumed_from}."] if event.resumed_from else [])
                    record.message = " ".join(notes) or "Running."
                elif isinstance(event, Step):
                    progress.losses.append(event.loss)
                    progress.it_per_s, progress.eta_s, record.step = event.it_per_s, event.eta_s, event.step
                    record.total_steps = event.total_steps
                elif isinstance(event, Sample):
                    progress.samples = self._save_samples(record.id, event)
                elif isinstance(event, Checkpoint):
                    record.checkpoint_step = event.step
                    self._write(record)
                elif isinstance(event, Finished):
                    record.style_path = event.path
                    self._end(record, "finished", f"Style {event.style_name!r} is ready after {event.steps_done} steps.")
                    # The style holds the result; checkpoints only served a resume (the images stay as the record).
                    shutil.rmtree(self._dir(record.id) / "checkpoints", ignore_errors=True)
                elif isinstance(event, Cancelled):
                    kept = f"A checkpoint at step {record.checkpoint_step} can be kept as a style or resumed." if event.checkpoint else "Nothing to keep."
                    self._end(record, "cancelled", f"Cancelled at step {event.step}. {kept}")
                elif isinstance(event, Failed):
                    self._end(record, "failed", event.message)
                self._lock.notify_all()
        with self._lock:
            if record.state == "running":  # the child died without a word: killed, or crashed hard
                self._end(record, "interrupted",
                          f"The training process stopped unexpectedly (exit code {job.exitcode}). {_resume_point(record)}")

    # -- helpers --------------------------------------------------------------------------
    def _dir(self, job_id: str) -> Path:
        return self.root / job_id

    def _end(self, record: JobRecord, state: str, message: str) -> None:
        record.state, record.message, record.ended, record.resume = state, message, time.time(), False
        self._write(record)
        self._lock.notify_all()

    def _write(self, record: JobRecord) -> None:
        write_text_atomic(self._dir(record.id) / "job.json", json.dumps(asdict(record), indent=1))

    def _save_samples(self, job_id: str, event: Sample) -> list[tuple[str, str]]:
        folder = self._dir(job_id) / "samples"
        folder.mkdir(exist_ok=True)
        saved = []
        for index, (image, prompt) in enumerate(zip(event.images, event.prompts)):
            path = folder / f"step-{event.step:06d}-{index}.png"
            image.save(path)
            saved.append((str(path), f"step {event.step}: {prompt}"))
        return saved

    def _thumbnail(self, job_id: str):
        from PIL import Image

        samples = sorted((self._dir(job_id) / "samples").glob("*.png"))
        images = sorted((self._dir(job_id) / "images").glob("*.png"))
        source = samples[-1] if samples else images[0] if images else None  # the newest sample, else a training image
        return Image.open(source).convert("RGB") if source else None


def _resume_point(record: JobRecord) -> str:
    where = f"step {record.checkpoint_step}" if record.checkpoint_step else "the start (no checkpoint yet)"
    return f"Resume continues from {where}."


def _write_images(folder: Path, images: ImageSet) -> None:
    """The accepted training set as numbered PNGs, with a .txt beside each image that has a caption."""
    folder.mkdir(parents=True)
    for index, (image, caption) in enumerate(zip(images.images, images.captions)):
        image.save(folder / f"{index:04d}.png")
        if caption:
            (folder / f"{index:04d}.txt").write_text(caption)
