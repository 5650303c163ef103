"""Training in a real child process: events arrive, cancel stops it, a crash becomes a Failed event."""

from __future__ import annotations

import time

from tests.conftest import pattern_image
from trainer.config import make_config
from trainer.data import ImageSet
from trainer.events import Failed, Finished, Started, Step
from trainer.jobs import TrainingJob


def _images():
    return ImageSet(images=[pattern_image(i) for i in range(2)], captions=[None, None], names=["a", "b"])


def test_job_streams_events_and_saves_the_style(library):
    cfg = make_config("Quick", style_name="child", steps=4, num_samples=0)
    events = list(TrainingJob(cfg, _images(), None, library.root.parent).start().events())
    assert isinstance(events[0], Started) and [e.step for e in events if isinstance(e, Step)] == [1, 2, 3, 4]
    assert isinstance(events[-1], Finished) and library.exists("child")


def test_cancel_stops_the_child_within_seconds(library):
    cfg = make_config("Quick", style_name="long", steps=100_000, num_samples=0)
    job = TrainingJob(cfg, _images(), None, library.root.parent).start()
    events = job.events()
    for event in events:
        if isinstance(event, Step):
            break
    started = time.monotonic()
    job.cancel()
    rest = list(events)
    assert time.monotonic() - started < 10
    assert isinstance(rest[-1], Failed) and "cancelled" in rest[-1].message
    assert not job.alive and not library.exists("long")


def test_a_failing_child_reports_why(library):
    cfg = make_config("Quick", style_name="nomodel", steps=2)
    events = list(TrainingJob(cfg, _images(), "/no/such/model", library.root.parent).start().events())
    assert isinstance(events[-1], Failed) and "/no/such/model" in events[-1].message
