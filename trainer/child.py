"""One training run in a child process: a fresh interpreter, so a crash or an out-of-memory error there
never takes the web server down. trainer/jobs.py runs one at a time.

The child trains with train(), saves the style it hands back into the library, and reports every
event to the parent through a queue; every outcome, an exception included, ends as an event.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from core.threads import TRAINING, torch_threads
from styles.library import StyleLibrary
from trainer.config import TrainConfig
from trainer.events import TERMINAL, Event, Failed, Finished, Started

CANCEL_GRACE_S = 15.0  # a child that ignores the stop flag this long is killed
PARENT_CHECK_S = 1.0
ORPHAN_GRACE_S = 30.0  # an orphaned child that has not stopped (with its checkpoint) this long exits anyway


class TrainingJob:
    """One training run in a child process, reading its images from `job_dir`.

    >>> job = TrainingJob(cfg, model=None, workspace="ws", job_dir="ws/jobs/0001").start()  # doctest: +SKIP
    >>> for event in job.events(): print(event)                                              # doctest: +SKIP
    """

    def __init__(self, cfg: TrainConfig, model: str | None, workspace: str | Path, job_dir: str | Path,
                 resume: bool = False, model_config: str | None = None, threads: int | None = None):
        cfg.validate()
        context = mp.get_context("spawn")  # a fresh interpreter: no state shared with the web server
        self._events = context.Queue()
        self._stop = context.Event()
        self._process = context.Process(
            target=_run,
            args=(cfg.to_dict(), model, model_config, str(workspace), str(job_dir), resume, self._events, self._stop,
                  os.getpid(), threads),
            daemon=True,
        )
        self.cancel_requested = False  # cancel() was called: however the child ends, the user asked for it

    def start(self) -> TrainingJob:
        self._process.start()
        return self

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def events(self, poll_s: float = 0.25) -> Iterator[Event]:
        """Yield the child's events until a terminal one; a child that dies silently ends the stream.

        Returns without a terminal event when the child died (killed, crashed): the caller decides.
        """
        stop_requested_at, heard = None, False
        while True:
            try:
                event = self._events.get(timeout=poll_s)
            except queue.Empty:
                if self._stop.is_set():  # cancel asked: give the child its grace time, then kill it
                    stop_requested_at = stop_requested_at or time.monotonic()
                    # Before its first event the child is still starting (imports, model, captions): it has
                    # trained nothing that a checkpoint would keep, so it need not be waited for.
                    late = time.monotonic() - stop_requested_at > CANCEL_GRACE_S
                    if (late or not heard) and self._process.is_alive():
                        self._process.kill()  # SIGKILL: the child takes SIGTERM as a request to stop
                if self._process.is_alive():
                    continue
                try:  # the child may have sent its last event just before exiting
                    event = self._events.get(timeout=1.0)
                except queue.Empty:
                    return
            heard = True
            yield event
            if isinstance(event, TERMINAL):
                self._process.join(timeout=CANCEL_GRACE_S)
                return

    def cancel(self) -> None:
        """Ask the loop to stop between steps (it saves a checkpoint first); events() enforces the grace time."""
        self.cancel_requested = True
        self._stop.set()

    def close(self) -> None:
        """Make sure the child is gone: asked to stop (it checkpoints on the way out), killed after the grace time.

        For a parent that stops listening before the end (its own failure): nothing trains on unseen.
        """
        if self._process.is_alive():
            self._stop.set()
            self._process.join(CANCEL_GRACE_S)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(CANCEL_GRACE_S)

    @property
    def exitcode(self) -> int | None:
        return self._process.exitcode


def _run(cfg_dict, model, model_config, workspace, job_dir, resume, events, stop, parent_pid, threads) -> None:
    """Child process body: every outcome, including an exception, ends as an event."""
    # Ctrl-C reaches every process of the terminal and a service stop may SIGTERM them all: the app stops
    # this one in order, and a SIGTERM meant for it alone is a request to stop with a checkpoint too.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    _stop_when_orphaned(parent_pid, stop, events)
    try:
        # Imported here, inside the failure boundary: a broken install ends as a Failed event with its reason.
        import torch

        from models.base import load_base
        from models.threads import use_threads
        from trainer.checkpoints import CheckpointDir
        from trainer.data import ingest
        from trainer.train import train

        use_threads(torch_threads(TRAINING, threads))  # in this process: the app beside it keeps a core
        threads = torch.get_num_threads()
        cfg = TrainConfig.from_dict(cfg_dict)
        library = StyleLibrary(workspace)
        base = load_base(model, cfg.precision, model_config)
        images = ingest(Path(job_dir) / "images", cfg.resolution or base.resolution)
        checkpoints = CheckpointDir(Path(job_dir) / "checkpoints", cfg.keep_checkpoints)
        log_dir = Path(job_dir) / "logs"  # TensorBoard, when installed: tensorboard --logdir workspace/jobs
        for event in train(cfg, images, base, stop, checkpoints=checkpoints, resume=resume, log_dir=log_dir):
            if isinstance(event, Started):
                event = dataclasses.replace(event, threads=threads)
            if isinstance(event, Finished):  # train() hands the style back; the job saves it
                try:
                    name = _save_style(library, event)
                except OSError as err:  # the workspace refused the write: the checkpoints are still there
                    event = Failed(f"The trained style could not be saved: {err}. Free some space or make the "
                                   "workspace writable, then press Resume: the job continues from its last checkpoint.")
                else:  # on disk now: the parent gets the news
                    event = dataclasses.replace(event, style_name=name, adapter=None, thumbnail=None)
            events.put(event)
    except Exception as err:  # reported to the parent, never swallowed
        events.put(Failed(f"Training failed: {type(err).__name__}: {err}"))


def _save_style(library: StyleLibrary, event: Finished) -> str:
    """Save a finished run's style; under the next free name ("ink-2") when its own was taken while it
    trained (the job manager reserves it, but a style can still arrive by another way): nothing is lost."""
    data = event.adapter.to_bytes()
    for name in [event.style_name] + [f"{event.style_name}-{i}" for i in range(2, 100)]:
        try:
            library.save(name, data, thumbnail=event.thumbnail)
            return name
        except FileExistsError:
            if not library.exists(name):  # not a taken name: the workspace itself refused
                raise
    raise FileExistsError(f"Styles {event.style_name!r} to {event.style_name + '-99'!r} all exist; "
                          "rename or delete some, then press Resume.")


def _stop_when_orphaned(parent_pid: int, stop, events) -> None:
    """If the app dies (even by kill -9), stop at the next step: a checkpoint is saved, nothing runs on unseen.

    Nobody reads the events any more, so they are not waited for at exit (a full pipe would block it);
    a child that has not stopped within ORPHAN_GRACE_S (stuck in a long computation) exits anyway.
    """

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(PARENT_CHECK_S)
        events.cancel_join_thread()
        stop.set()
        time.sleep(ORPHAN_GRACE_S)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()
