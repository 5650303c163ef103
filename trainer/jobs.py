"""Run train() in a child process, so a training run never blocks or crashes the app.

The child loads its own copy of the base model, trains, writes the style into the workspace
and sends every event back through a queue. Cancel asks the loop to stop between steps; a child
that does not stop in time is terminated.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
from pathlib import Path
from typing import Iterator

from trainer.config import TrainConfig
from trainer.data import ImageSet
from trainer.events import TERMINAL, Event, Failed

CANCEL_GRACE_S = 15.0


class TrainingJob:
    """One training run in a child process.

    >>> job = TrainingJob(cfg, images, model=None, workspace="workspace").start()  # doctest: +SKIP
    >>> for event in job.events(): print(event)                                     # doctest: +SKIP
    """

    def __init__(self, cfg: TrainConfig, images: ImageSet, model: str | None, workspace: str | Path):
        cfg.validate()
        context = mp.get_context("spawn")  # a fresh interpreter: no state shared with the web server
        self._events = context.Queue()
        self._stop = context.Event()
        self._process = context.Process(
            target=_run, args=(cfg.to_dict(), images, model, str(workspace), self._events, self._stop), daemon=True
        )

    def start(self) -> "TrainingJob":
        self._process.start()
        return self

    def events(self, poll_s: float = 0.25) -> Iterator[Event]:
        """Yield the child's events until a Finished or Failed; a dead child becomes a Failed event."""
        while True:
            try:
                event = self._events.get(timeout=poll_s)
            except queue.Empty:
                if self._process.is_alive():
                    continue
                try:  # the child may have sent its last event just before exiting
                    event = self._events.get(timeout=1.0)
                except queue.Empty:
                    yield Failed(f"The training process ended unexpectedly (exit code {self._process.exitcode}).")
                    return
            yield event
            if isinstance(event, TERMINAL):
                self._process.join(timeout=CANCEL_GRACE_S)
                return

    def cancel(self) -> None:
        """Ask the loop to stop between steps; terminate the child if it does not within the grace time."""
        self._stop.set()
        deadline = time.monotonic() + CANCEL_GRACE_S
        while self._process.is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        if self._process.is_alive():
            self._process.terminate()

    @property
    def alive(self) -> bool:
        return self._process.is_alive()


def _run(cfg_dict, images, model, workspace, events, stop) -> None:
    """Child process body: every outcome, including an exception, ends as an event."""
    try:
        from styles.library import StyleLibrary
        from trainer.base import load_base
        from trainer.train import train

        cfg = TrainConfig.from_dict(cfg_dict)
        base = load_base(model, cfg.precision)
        for event in train(cfg, images, base, StyleLibrary(workspace), stop=stop):
            events.put(event)
    except Exception as err:  # reported to the parent, never swallowed
        events.put(Failed(f"Training failed: {type(err).__name__}: {err}"))
