"""How many CPU threads torch may use in each of the app's processes (issue 18).

Two processes that each start one thread per core on a busy machine take turns on every core and
run 7-12x slower than with one thread each (torch's thread pool spins while it waits for its
slowest thread). So the threads are sized from the cores this process may really run on, and the
training child leaves one core to the app beside it (its web server and generation).
"""

from __future__ import annotations

import os

ALONE = "alone"  # nothing else of ours computes meanwhile: the CLI, or generation while no job trains
TRAINING = "training"  # the training child, beside the app that serves the page and may generate
BESIDE_TRAINING = "beside training"  # generation (or captioning) in the app while a job trains


def available_cores() -> int:
    """The cores this process may run on: a container's or `taskset`'s share, not the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def torch_threads(role: str, setting: int | None = None, cores: int | None = None, environ=None) -> int:
    """Threads for torch in a process with this role: `setting` (the `--threads` flag) when given, else
    OMP_NUM_THREADS when set (the usual way to pin them, which torch itself obeys), else sized by the cores.

    >>> [torch_threads(role, cores=8, environ={}) for role in (ALONE, TRAINING, BESIDE_TRAINING)]
    [8, 7, 1]
    """
    pinned = (os.environ if environ is None else environ).get("OMP_NUM_THREADS", "")
    if setting or pinned.isdigit() and int(pinned) > 0:
        return int(setting or pinned)
    cores = cores or available_cores()
    if role == ALONE:
        return cores
    if role == TRAINING:
        return max(1, cores - 1)
    if role == BESIDE_TRAINING:
        return 1  # the core the training child leaves
    raise ValueError(f"Unknown role {role!r}; one of {ALONE}, {TRAINING}, {BESIDE_TRAINING}.")
