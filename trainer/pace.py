"""The speed and time left that a run reports: steady, so the estimate does not swing (issue 18)."""

from __future__ import annotations

SMOOTHING = 0.1  # weight of the newest step in the moving average: a lasting change shows within ~20 steps
MAX_JUMP = 2.0  # one slow step (the OS, a busy neighbour) counts as at most this many times the average


class Pace:
    """An exponential moving average of the time a training step takes: a wobble of the machine's load
    averages out, and a single slow step moves it little.

    The first step is left out: it warms up (lazy initialisation, CUDA graph capture) and would weigh
    on the estimate for long. The work between steps (samples, validation, checkpoints) comes rarely
    and would make the average jump, so it is counted apart (`between`: the time since the last step
    ended) and spread over the steps timed so far: the estimate holds it without swinging.

    >>> pace = Pace()
    >>> for seconds, between in ((5.0, 0.0), (0.5, 0.0), (0.5, 0.0), (0.5, 2.0)): pace.add(seconds, between)
    >>> pace.it_per_s, pace.seconds_left(10)
    (2.0, 15.0)
    """

    def __init__(self) -> None:
        self.step_s = 0.0  # the average, 0 before the first step
        self.between_s = 0.0  # all the time spent between steps since the warm-up
        self._timed = 0

    def add(self, seconds: float, between: float = 0.0) -> None:
        """One step took `seconds`; `between` seconds passed since the step before it ended."""
        self._timed += 1
        if self._timed <= 2:  # the first step, then the first after the warm-up: the average starts over
            self.step_s = seconds
        else:
            self.step_s += SMOOTHING * (min(seconds, MAX_JUMP * self.step_s) - self.step_s)
            self.between_s += between

    @property
    def it_per_s(self) -> float:
        return 1.0 / self.step_s if self.step_s else 0.0

    def seconds_left(self, steps_left: int) -> float:
        between_per_step = self.between_s / max(self._timed - 2, 1)
        return steps_left * (self.step_s + between_per_step)
