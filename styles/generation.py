"""What one generation request may ask for, and the line of requests waiting for the one pipeline (issue 18).

Every value a client sends is checked before any work, and a refusal names the field, what is wrong with
the value (echoed by its first 40 characters at most) and what is allowed. The limits keep one request
from holding the pipeline for minutes: a 3 MB prompt cost 640 MB of memory, and a 1024 px picture on
the 64 px embedded model ran over 150 s while everyone else waited.

Generations take turns in arrival order (GenerationLine); each holds a Ticket, which its owner (a page
or API session) can cancel: while it waits, it leaves the line; while it runs, the denoising loop stops
at the next step (diffusers' `callback_on_step_end`, setting `pipe._interrupt` as diffusers' own
interrupt does).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from core.names import brief

MAX_PROMPT_CHARS = 10_000  # a prompt is tokenized and cut at 77 tokens; more is only cost (memory, PNG text)
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's largest
RANDOM_SEED = -1  # asks for a random seed, as in AUTOMATIC1111; the recipe records the seed used
RANDOM_SEEDS = 2**32  # a random seed is drawn below this: short enough to read and type back
STEPS_RANGE = (1, 100)
GUIDANCE_RANGE = (0.0, 20.0)
MAX_IMAGES = 8  # pictures per request
LARGE_FACTOR = 2  # sides up to this many times the base model's native side, unless the server allows large
MAX_SIDE = 2048  # the ceiling even then


class GenerationCancelled(ValueError):
    """The owner cancelled this generation (a ValueError: the UI shows its message, the app keeps serving)."""


def text(value, name: str, limit: int = MAX_PROMPT_CHARS) -> str:
    """A prompt-like field: text (None is empty) of at most `limit` characters."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{name} is {brief(value)}: not text. Send it as a string.")
    if len(value) > limit:
        raise ValueError(f"{name} is {len(value):,} characters long: too long. Use at most {limit:,} characters "
                         "(the model reads only its first 77 tokens).")
    return value


def whole(value, name: str, lo: int, hi: int, allowed: str = "") -> int:
    """A whole number from lo to hi; `allowed` describes the range (default "a whole number from lo to hi")."""
    allowed = allowed or f"a whole number from {lo} to {hi}"
    problem, number = _as_whole(value)
    if problem is None and not lo <= number <= hi:
        problem = "too small" if number < lo else "too large"
    if problem:
        raise ValueError(f"{name} is {brief(value)}: {problem}. Use {allowed}.")
    return number


def number(value, name: str, lo: float, hi: float) -> float:
    """A finite number from lo to hi."""
    problem, result = None, None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        problem = "not a number"
    else:
        try:
            result = float(value)
            problem = None if math.isfinite(result) else "not a finite number"
        except ValueError:
            problem = "not a number"
    if problem is None and not lo <= result <= hi:
        problem = "too small" if result < lo else "too large"
    if problem:
        raise ValueError(f"{name} is {brief(value)}: {problem}. Use a number from {lo:g} to {hi:g}.")
    return result


def _as_whole(value) -> tuple[str | None, int | None]:
    """(problem or None, the value as an int): exact for ints and digit strings, however large."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return "not a number", None
    if isinstance(value, int):
        return None, value
    if isinstance(value, str):
        try:
            return None, int(value)  # "12": exact, where float("12345678901234567890") would round
        except ValueError:
            pass
    try:
        as_float = float(value)
    except ValueError:
        return "not a number", None
    if not math.isfinite(as_float):
        return "not a finite number", None
    if not as_float.is_integer():
        return "not a whole number", None
    return None, int(as_float)


@dataclass
class Ticket:
    """One generation's place in the line; `owner` is who may cancel it (a page or API session)."""

    owner: str = ""
    cancelled: threading.Event = field(default_factory=threading.Event)
    step: int = 0  # denoising steps done, while it runs
    steps: int = 0

    def stop_at_next_step(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        """diffusers' callback_on_step_end: count the step; on cancel, interrupt the denoising loop."""
        self.step = step + 1
        if self.cancelled.is_set():
            pipe._interrupt = True  # what diffusers' pipelines check at each step (`if self.interrupt: continue`)
        return callback_kwargs


class GenerationLine:
    """Generations in arrival order: the first runs, the others wait; any can be cancelled by its owner."""

    def __init__(self):
        self._changed = threading.Condition()
        self._line: list[Ticket] = []

    @contextmanager
    def turn(self, ticket: Ticket) -> Iterator[Ticket]:
        """Wait for `ticket`'s turn and hold it for the block; GenerationCancelled when cancelled while waiting."""
        with self._changed:
            self._line.append(ticket)
            while self._line[0] is not ticket and not ticket.cancelled.is_set():
                self._changed.wait()
            if ticket.cancelled.is_set():
                self._leave(ticket)
                raise GenerationCancelled("Generation cancelled before it started.")
        try:
            yield ticket
        finally:
            with self._changed:
                self._leave(ticket)

    def _leave(self, ticket: Ticket) -> None:
        self._line.remove(ticket)
        self._changed.notify_all()

    def position(self, owner: str = "") -> int | None:
        """Where the owner's first generation stands: 0 running, n waiting behind n others; None: it has none."""
        with self._changed:
            return next((index for index, ticket in enumerate(self._line) if ticket.owner == owner), None)

    def running(self) -> Ticket | None:
        with self._changed:
            return self._line[0] if self._line else None

    def waiting(self) -> int:
        """How many generations wait behind the running one."""
        with self._changed:
            return max(len(self._line) - 1, 0)

    def cancel(self, owner: str = "") -> int:
        """Cancel every generation of `owner`, running or waiting; returns how many there were."""
        with self._changed:
            mine = [ticket for ticket in self._line if ticket.owner == owner]
            for ticket in mine:
                ticket.cancelled.set()
            self._changed.notify_all()
        return len(mine)
