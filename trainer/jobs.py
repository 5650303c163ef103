"""Training jobs: a queue on disk, one child process at a time (trainer/child.py), checkpoints, cancel and resume.

    workspace/jobs/<id>/job.json                 the record: config, state, step, message (written atomically)
    workspace/jobs/<id>/images/0000.png (+ .txt)  the training set as it was accepted
    workspace/jobs/<id>/checkpoints/              trainer/checkpoints.py
    workspace/jobs/<id>/samples/                  sample images, as they arrive
    workspace/jobs/<id>/validation/               the validation set drawn at each checkpoint (step-NNNNNN-i.png)
    workspace/jobs/<id>/validation.json           [{step, score, images, prompts}, ...], one entry per checkpoint
    workspace/jobs/<id>/captions.json             {image file: the caption it was trained with}

Every job is a record on disk first, so nothing is lost when the app or the child dies: on start,
JobManager marks jobs that were queued or running as interrupted, and Resume continues them from
their last checkpoint. A job's state changes only along MOVES, in one method (JobManager._move).

The worker thread runs for as long as the app does: building a job, starting its child, following
it and writing its record all happen inside one failure boundary per job, so a record this version
cannot use or a workspace that refuses a write fails that job, with the reason, and the queue goes on.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path

from PIL import Image

from core.files import staged_folder, write_text_atomic
from styles.library import StyleLibrary
from trainer.checkpoints import CheckpointDir
from trainer.child import TrainingJob
from trainer.config import TrainConfig
from trainer.data import ImageSet
from trainer.events import Cancelled, Checkpoint, Failed, Finished, Sample, Started, Step, Validation
from trainer.train import checkpoint_adapter

log = logging.getLogger(__name__)


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"  # the app or the child died while it ran
    DISCARDED = "discarded"  # its checkpoints and images deleted; the record stays as history


# Every move a job's state may make; JobManager._move refuses any other.
MOVES: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED, JobState.INTERRUPTED, JobState.FAILED}),
    JobState.RUNNING: frozenset({JobState.FINISHED, JobState.FAILED, JobState.CANCELLED, JobState.INTERRUPTED}),
    # A stopped job can be resumed (queued), kept (its checkpoint saved as a style: finished) or discarded.
    JobState.INTERRUPTED: frozenset({JobState.QUEUED, JobState.FINISHED, JobState.DISCARDED}),
    JobState.CANCELLED: frozenset({JobState.QUEUED, JobState.FINISHED, JobState.DISCARDED}),
    JobState.FAILED: frozenset({JobState.QUEUED, JobState.FINISHED, JobState.DISCARDED}),
    JobState.FINISHED: frozenset({JobState.DISCARDED}),
    JobState.DISCARDED: frozenset({JobState.DISCARDED}),
}
ACTIVE = (JobState.QUEUED, JobState.RUNNING)
STOPPED = (JobState.INTERRUPTED, JobState.CANCELLED, JobState.FAILED)  # resumable, or their checkpoint kept
# A full disk, a read-only or foreign-owned folder, something else where a file should go: fixable by the user.
REFUSED_WRITES = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EISDIR, errno.ENOTDIR}


@dataclass
class JobRecord:
    id: str
    style_name: str
    config: dict
    model: str | None
    state: JobState = JobState.QUEUED
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


def read_record(path: Path) -> tuple[JobRecord | None, list[str]]:
    """A job record from its job.json, and what in it this version cannot use (then it must not run here).

    (None, []) when the file is not a job record at all: a foreign or damaged folder, left alone.
    """
    try:
        data = json.loads(path.read_text())
        known = {f.name for f in dataclasses.fields(JobRecord)}
        record = JobRecord(**{key: value for key, value in data.items() if key in known})
    except (OSError, ValueError, TypeError, AttributeError):
        return None, []
    problems = []
    if unknown := sorted(set(data) - known):
        problems.append(f"fields this version does not know ({', '.join(unknown)})")
    try:
        record.state = JobState(record.state)
    except ValueError:
        problems.append(f"a state this version does not know ({record.state!r})")
        record.state = JobState.FAILED
    try:
        TrainConfig.from_dict(record.config)
    except (ValueError, TypeError, AttributeError) as err:
        problems.append(f"settings this version cannot read ({err})")
    return record, problems


@dataclass
class Progress:
    """What the UI shows about a job while it runs (kept in memory, rebuilt from disk after a restart)."""

    losses: list[float] = field(default_factory=list)
    it_per_s: float = 0.0
    eta_s: float = 0.0
    threads: int = 0  # the CPU threads the training process uses
    samples: list[tuple[str, str]] = field(default_factory=list)  # (png path, prompt) of the newest samples
    # one {"step", "score", "images": [png paths], "prompts"} per validation: the score curve and the sample strips
    validation: list[dict] = field(default_factory=list)


class JobManager:
    """The job queue of one workspace: submit, follow, cancel, resume, keep or discard.

    >>> jobs = JobManager("workspace").start()      # doctest: +SKIP
    >>> job_id = jobs.submit(cfg, images)            # doctest: +SKIP
    >>> for record in jobs.follow(job_id): print(record.state, record.step)  # doctest: +SKIP
    """

    def __init__(self, workspace: str | Path, model: str | None = None, model_config: str | None = None,
                 threads: int | None = None):
        self.workspace = Path(workspace)
        self.threads = threads  # CPU threads of the training process; None: core/threads.py sizes them
        self.root = self.workspace / "jobs"
        self.root.mkdir(parents=True, exist_ok=True)
        self.model, self.model_config = model, model_config  # model_config: configs for a single-file model
        self.library = StyleLibrary(self.workspace)
        self._lock = threading.Condition()
        self._records: dict[str, JobRecord] = {}
        self._progress: dict[str, Progress] = {}
        self._foreign: dict[str, str] = {}  # job id -> why this version leaves its record as it is
        self._cancelled: set[str] = set()  # jobs the user cancelled (not stopped by the app closing)
        self._running: TrainingJob | None = None
        self._running_id: str | None = None
        self._worker: threading.Thread | None = None
        self._closing = False
        self._recover()

    # -- life cycle -----------------------------------------------------------------------
    def start(self) -> JobManager:
        """Start the worker thread that runs queued jobs one after the other."""
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name="style-studio-jobs", daemon=True)
            self._worker.start()
        return self

    def close(self) -> None:
        """Stop the worker: a running job is asked to stop (it keeps a checkpoint, to resume: it becomes
        interrupted) and is terminated if it has not stopped within its grace time; queued jobs stay queued."""
        with self._lock:
            self._closing = True
            if self._running:
                self._running.cancel()
            self._lock.notify_all()
        if self._worker:
            self._worker.join()

    def _recover(self) -> None:
        """Read every job record; those the last app left queued or running become interrupted.

        A record this version cannot use (written by a newer one, or edited by hand) is listed as
        failed with the reason and never written to: nothing in it is lost.
        """
        for path in sorted(self.root.glob("*/job.json")):
            record, problems = read_record(path)
            if record is None:
                continue
            progress = Progress()
            # The header alone (step, losses): start-up never loads weights or optimizer moments.
            latest = CheckpointDir(self._dir(record.id) / "checkpoints").latest_progress()
            if latest:
                record.checkpoint_step, progress.losses = latest
            progress.validation = _read_validation(self._dir(record.id))
            with self._lock:
                if problems:
                    reason = (f"Its record has {'; '.join(problems)}: "
                              "this version of Style Studio cannot run it and leaves it as it is.")
                    self._foreign[record.id] = reason
                    record.state, record.message = JobState.FAILED, reason
                elif record.state in ACTIVE:
                    self._move(record, JobState.INTERRUPTED,
                               f"The app stopped while this job was {record.state}. {_resume_point(record)}")
                self._records[record.id] = record
                self._progress[record.id] = progress

    # -- actions --------------------------------------------------------------------------
    def submit(self, cfg: TrainConfig, images: ImageSet) -> str:
        """Queue a training job; its images are copied into the job's folder. Returns the job id."""
        cfg.validate()
        with self._lock:
            self.library.ensure_free(cfg.style_name)
            self.check_name_free(cfg.style_name)
            job_id = self._next_id()
            record = JobRecord(job_id, cfg.style_name, cfg.to_dict(), self.model, total_steps=cfg.steps,
                               skipped=images.skipped_lines())
            with staged_folder(self._dir(job_id)) as folder:  # a job folder appears whole or not at all
                _write_images(folder / "images", images)
                write_text_atomic(folder / "job.json", _record_json(record))
            self._records[job_id], self._progress[job_id] = record, Progress()
            self._lock.notify_all()
        return job_id

    def cancel(self, job_id: str) -> str:
        """Cancel a queued job at once, or ask a running one to stop (it keeps a checkpoint)."""
        with self._lock:
            record = self._actionable(job_id)
            if record.state == JobState.QUEUED:
                self._move(record, JobState.CANCELLED, "Cancelled before it started.")
            elif record.state == JobState.RUNNING and self._running_id == job_id and self._running:
                self._cancelled.add(job_id)
                self._running.cancel()
                record.message = "Stopping after the current step…"
            else:
                raise ValueError(f"Job {job_id} is {record.state}; only queued or running jobs can be cancelled.")
            return record.message

    def resume(self, job_id: str) -> None:
        """Queue an interrupted, cancelled or failed job again; it continues from its newest checkpoint."""
        with self._lock:
            record = self._actionable(job_id)
            if record.state not in STOPPED:
                raise ValueError(f"Job {job_id} is {record.state}; only {', '.join(STOPPED)} jobs can be resumed.")
            self.library.ensure_free(record.style_name)
            self.check_name_free(record.style_name)
            self._cancelled.discard(job_id)  # a cancel was for the run before
            self._move(record, JobState.QUEUED, "Queued to resume.", resume=True)

    def keep(self, job_id: str, style_name: str | None = None) -> str:
        """Save the newest checkpoint of a stopped job as a style; returns the style's name."""
        with self._lock:
            record = self._actionable(job_id)
            if record.state not in STOPPED:
                raise ValueError(f"Job {job_id} is {record.state}; only a stopped job's checkpoint can be kept.")
            state, _ = CheckpointDir(self._dir(job_id) / "checkpoints").load_latest()
            if state is None:
                raise ValueError(f"Job {job_id} has no checkpoint to keep (it stopped before the first one).")
            name = style_name or record.style_name
            self.check_name_free(name)
            path = self.library.save(name, checkpoint_adapter(state, name).to_bytes(),
                                     thumbnail=self._thumbnail(job_id))
            self._move(record, JobState.FINISHED, f"Kept the checkpoint at step {state.step} as style {name!r}.",
                       style_path=str(path))
            shutil.rmtree(self._dir(job_id) / "checkpoints", ignore_errors=True)
            return name

    def discard(self, job_id: str) -> None:
        """Delete a stopped job's checkpoints and images; its record stays in the history."""
        with self._lock:
            record = self._actionable(job_id)
            if record.state in ACTIVE:
                raise ValueError(f"Job {job_id} is {record.state}; cancel it first.")
            for part in ("checkpoints", "images"):
                shutil.rmtree(self._dir(job_id) / part, ignore_errors=True)
            self._move(record, JobState.DISCARDED, "Checkpoints and images deleted.")

    def holder(self, name: str) -> JobRecord | None:
        """The queued or running job that will save its style as `name`, if any: the name is reserved for it."""
        with self._lock:
            return next((r for r in self._records.values() if r.style_name == name and r.state in ACTIVE), None)

    def check_name_free(self, name: str) -> None:
        """Refuse a style name reserved by a queued or running job (issue 18): an import or rename must not
        take it while the job trains."""
        if other := self.holder(name):
            raise ValueError(f"Job {other.id} ({other.state}) will save its style as {name!r}; "
                             "pick another name, or cancel that job first.")

    # -- reading --------------------------------------------------------------------------
    @property
    def training(self) -> bool:
        """Whether a training process is running now (generation beside it gets fewer threads)."""
        return self._running is not None

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
            return next((i + 1 for i, r in enumerate(self._queued()) if r.id == job_id), 0)

    def follow(self, job_id: str, poll_s: float = 0.5) -> Iterator[JobRecord]:
        """Yield the record whenever it changes, until the job is no longer queued or running."""
        last = None
        while True:
            record = self.get(job_id)
            progress = self._progress[job_id]
            snapshot = (record.state, record.step, record.message, len(progress.samples), len(progress.validation))
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
        """Run queued jobs one after the other, for as long as the app runs: nothing one job does stops it."""
        while (record := self._next_queued()) is not None:
            try:
                self._run(record)
            except Exception as err:  # the queue must keep going whatever one job does
                log.exception("job %s could not run", record.id)
                self._fail(record, _failure(err, record))
            finally:
                with self._lock:
                    self._running = self._running_id = None
                    self._lock.notify_all()

    def _next_queued(self) -> JobRecord | None:
        """The job to run next, once there is one; None when the manager is closing."""
        with self._lock:
            while not self._closing and not (queued := self._queued()):
                self._lock.wait(timeout=1.0)
            return None if self._closing else queued[0]

    def _run(self, record: JobRecord) -> None:
        """Build one job from its record, start its child and follow it to the end."""
        with self._lock:
            if self._closing:
                return  # it stays queued
            cfg = TrainConfig.from_dict(record.config)  # a record edited since it was queued may not read
            job = TrainingJob(cfg, record.model, self.workspace, self._dir(record.id), record.resume, self.model_config,
                              self.threads)
            self._move(record, JobState.RUNNING, "Starting…")
            self._running, self._running_id = job, record.id
        try:
            job.start()
            with self._lock:
                record.pid = job.pid
                self._write(record)  # on disk too: who trains for this job
            self._consume(record, job)
        finally:
            job.close()  # a child we stopped listening to (our own failure) must not train on unseen

    def _consume(self, record: JobRecord, job: TrainingJob) -> None:
        progress, started = self._progress[record.id], False
        for event in job.events():
            with self._lock:
                if isinstance(event, Started):
                    started = True
                    progress.losses, record.step = list(event.losses), event.resumed_from
                    progress.threads = event.threads
                    notes = event.notes + ([f"Resumed from step {event.resumed_from}."] if event.resumed_from else [])
                    record.message = " ".join(notes) or "Running."
                    if event.captions:
                        write_text_atomic(self._dir(record.id) / "captions.json",
                                          json.dumps(dict(zip(event.image_names, event.captions)), indent=1))
                elif isinstance(event, Step):
                    progress.losses.append(event.loss)
                    progress.it_per_s, progress.eta_s, record.step = event.it_per_s, event.eta_s, event.step
                    record.total_steps = event.total_steps
                elif isinstance(event, Sample):
                    progress.samples = self._save_samples(record.id, event)
                elif isinstance(event, Validation):
                    progress.validation = self._save_validation(record.id, event, progress.validation)
                elif isinstance(event, Checkpoint):
                    record.checkpoint_step = event.step
                    self._write(record)
                elif isinstance(event, Finished):  # the child saved the style
                    kept = ("" if event.kept_step in (None, event.steps_done) else
                            f" Its weights are from step {event.kept_step}, the best on the validation prompts.")
                    if event.style_name != record.style_name:  # its name was taken meanwhile (child._save_style)
                        kept += (f" The name {record.style_name!r} was taken while the job trained, so it was "
                                 f"saved as {event.style_name!r}.")
                    self._move(record, JobState.FINISHED,
                               f"Style {event.style_name!r} is ready after {event.steps_done} steps.{kept}",
                               style_path=str(self.library.path_for(event.style_name)))
                    # The style holds the result; checkpoints only served a resume (the images stay as the record).
                    shutil.rmtree(self._dir(record.id) / "checkpoints", ignore_errors=True)
                elif isinstance(event, Cancelled):
                    self._stopped(record, f"at step {event.step}")
                elif isinstance(event, Failed):
                    self._move(record, JobState.FAILED, event.message)
                self._lock.notify_all()
        with self._lock:
            if record.state == JobState.RUNNING and job.cancel_requested:  # we ended it: still a stop asked for
                self._stopped(record, f"at step {record.step}" if started else "as its training process started")
            elif record.state == JobState.RUNNING:  # the child died without a word: killed, or crashed hard
                self._move(record, JobState.INTERRUPTED,
                           f"The training process stopped unexpectedly (exit code {job.exitcode}). "
                           f"{_resume_point(record)}")

    def _stopped(self, record: JobRecord, where: str) -> None:
        """A running job that stopped because it was asked to: cancelled by its user, or interrupted by the
        app closing (SIGTERM, Ctrl-C) or a signal to its process, which Resume continues."""
        if record.id not in self._cancelled:
            who = "The app" if self._closing else "Its training process"
            self._move(record, JobState.INTERRUPTED,
                       f"{who} was stopped while this job was running ({where}). {_resume_point(record)}")
            return
        kept = (f"A checkpoint at step {record.checkpoint_step} can be kept as a style or resumed."
                if record.checkpoint_step else "Nothing to keep.")
        self._move(record, JobState.CANCELLED, f"Cancelled {where}. {kept}")

    def _fail(self, record: JobRecord, message: str) -> None:
        """End a job that could not run as failed: in memory for certain, on disk if the workspace lets us."""
        with self._lock:
            if JobState.FAILED not in MOVES[record.state]:
                return  # it ended before the failure (finished, cancelled): that stands
            try:
                self._move(record, JobState.FAILED, message)
            except OSError as err:
                log.error("job %s failed and its record could not be written: %s", record.id, err)
                record.message += (f" Its record could not be written either ({err}); "
                                   "it will read as interrupted after a restart.")

    # -- helpers --------------------------------------------------------------------------
    def _move(self, record: JobRecord, state: JobState, message: str, **changes) -> None:
        """The one place a job's state changes: along MOVES only, then the record is written and waiters woken."""
        if state not in MOVES[record.state]:
            raise ValueError(f"Job {record.id} is {record.state} and cannot become {state}.")
        now = time.time()
        record.state, record.message = state, message
        if state == JobState.QUEUED:
            record.queued_at = now
        elif state == JobState.RUNNING:
            record.started = now
        else:
            record.ended, record.resume = now, False
        for name, value in changes.items():
            setattr(record, name, value)
        self._lock.notify_all()
        self._write(record)

    def _actionable(self, job_id: str) -> JobRecord:
        """The record a user action applies to; a record of another version is left as it is."""
        record = self.get(job_id)
        if job_id in self._foreign:
            raise ValueError(f"Job {job_id}: {self._foreign[job_id]}")
        return record

    def _queued(self) -> list[JobRecord]:
        """The queue, in the order it runs."""
        return sorted((r for r in self._records.values() if r.state == JobState.QUEUED),
                      key=lambda r: (r.queued_at, r.id))

    def _next_id(self) -> str:
        """One more than any job id or job folder: a damaged folder's number is not reused."""
        taken = [int(name) for name in [*self._records, *(p.name for p in self.root.iterdir())] if name.isdigit()]
        return f"{max(taken, default=0) + 1:04d}"

    def _dir(self, job_id: str) -> Path:
        return self.root / job_id

    def _write(self, record: JobRecord) -> None:
        write_text_atomic(self._dir(record.id) / "job.json", _record_json(record))

    def _save_samples(self, job_id: str, event: Sample) -> list[tuple[str, str]]:
        folder = self._dir(job_id) / "samples"
        folder.mkdir(exist_ok=True)
        saved = []
        for index, (image, prompt) in enumerate(zip(event.images, event.prompts)):
            path = folder / f"step-{event.step:06d}-{index}.png"
            image.save(path)
            saved.append((str(path), f"step {event.step}: {prompt}"))
        return saved

    def _save_validation(self, job_id: str, event: Validation, so_far: list[dict]) -> list[dict]:
        """Save one validation's pictures; the history (a resumed run's earlier steps dropped) goes to disk."""
        folder = self._dir(job_id) / "validation"
        folder.mkdir(exist_ok=True)
        paths = []
        for index, image in enumerate(event.images):
            paths.append(str(folder / f"step-{event.step:06d}-{index}.png"))
            image.save(paths[-1])
        entry = {"step": event.step, "score": event.score, "images": paths, "prompts": event.prompts}
        history = [item for item in so_far if item["step"] < event.step] + [entry]
        write_text_atomic(self._dir(job_id) / "validation.json", json.dumps(history))
        return history

    def _thumbnail(self, job_id: str) -> Image.Image | None:
        samples = sorted((self._dir(job_id) / "samples").glob("*.png"))
        images = sorted((self._dir(job_id) / "images").glob("*.png"))
        source = samples[-1] if samples else images[0] if images else None  # the newest sample, else a training image
        return Image.open(source).convert("RGB") if source else None


def _record_json(record: JobRecord) -> str:
    return json.dumps(asdict(record), indent=1)


def _read_validation(job_dir: Path) -> list[dict]:
    try:
        return json.loads((job_dir / "validation.json").read_text())
    except (OSError, ValueError):
        return []


def _failure(err: Exception, record: JobRecord) -> str:
    """What to tell the user about a job that could not run: the real problem, and what to do."""
    if isinstance(err, OSError) and err.errno in REFUSED_WRITES:
        return (f"The workspace refused a write: {err}. Free some space or make the workspace writable, "
                f"then press Resume. {_resume_point(record)}")
    return f"The job could not run: {type(err).__name__}: {err}"


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
