"""Files written whole or not at all, and the one safetensors header reader.

A crash, a kill -9 or a full disk in the middle of a write must never leave a half-written style,
checkpoint, job record or preset behind: everything is written to a temporary name in the same
folder, flushed, and renamed into place (a rename within one file system is atomic).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

# Files that are Python pickles, which run code when they are loaded: refused unread, for base
# models and adapters alike.
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle")
MAX_HEADER_BYTES = 16 * 1024 * 1024  # a LoRA or checkpoint header is kilobytes; anything near this is not one of ours
_UMASK_LOCK = threading.Lock()  # current_umask's fallback


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` whole or not at all: a temporary file in the same folder, fsync, rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes 0600; a style or export must be readable as any file we write (ComfyUI or A1111
        # running as another user read the copy): 0666 less the umask, as open() would give (issue 18).
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def current_umask() -> int:
    """The process's umask, read without changing it where Linux tells it (/proc/self/status, kernel 4.7+).

    os.umask can only be read by setting it, which for an instant applies to files other threads make
    (the server's uploads): only the fallback does that, and sets it back at once, under a lock so that
    two readers never restore each other's value.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def write_text_atomic(path: str | Path, text: str) -> Path:
    """write_bytes_atomic for UTF-8 text."""
    return write_bytes_atomic(path, text.encode("utf-8"))


@contextlib.contextmanager
def staged_folder(target: str | Path) -> Iterator[Path]:
    """Fill a hidden folder beside `target`, then rename it to `target`: the folder appears whole or not at all.

    Raises FileExistsError when `target` exists by the time the staged folder is complete (someone
    else made it first); the staged copy is removed either way.

    >>> with staged_folder("workspace/jobs/0007") as folder:   # doctest: +SKIP
    ...     (folder / "job.json").write_text("{}")
    """
    target = Path(target)
    staging = target.with_name(f".{target.name}-{time.monotonic_ns()}")
    staging.mkdir(parents=True)
    try:
        yield staging
        try:
            staging.rename(target)  # fails when target exists and is not empty
        except OSError as err:
            raise FileExistsError(f"{target} exists already") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # nothing left once renamed


def read_safetensors_header(path: str | Path) -> tuple[dict[str, str], dict[str, dict]]:
    """(metadata, tensor table) of a safetensors file, read without loading any tensor (or torch).

    Raises ValueError with the reason when the file is not a sane safetensors file.
    """
    path = Path(path)
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) != 8:
            raise ValueError(f"{path.name} is not a safetensors file (too short).")
        (size,) = struct.unpack("<Q", head)
        if size > MAX_HEADER_BYTES or size > path.stat().st_size - 8:
            raise ValueError(f"{path.name} is not a safetensors file (header size {size} is implausible).")
        try:
            header = json.loads(handle.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{path.name} is not a safetensors file (its header is not JSON).") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path.name} is not a safetensors file (its header is not a table).")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise ValueError(f"{path.name} is not a safetensors file (its __metadata__ is not a table).")
    # A file cut short after an intact header (a copy or download that stopped) reads like a good one until its
    # tensors are loaded: its size must be exactly what the header's data offsets add up to (issue 18, item 12).
    expected, actual = 8 + size + _data_end(header, path.name), path.stat().st_size
    if actual != expected:
        how = "truncated" if actual < expected else "longer than its header says"
        raise ValueError(f"{path.name} is damaged ({how}: its header describes {expected} bytes, the file has "
                         f"{actual}). Delete it, or copy it again from where it came from.")
    return metadata, header


def _data_end(header: dict, file_name: str) -> int:
    """The end of the last tensor's data, from the tensor table's data_offsets; ValueError when one is malformed."""
    end = 0
    for name, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise ValueError(f"{file_name} is not a safetensors file (tensor {str(name)[:40]!r} has no valid "
                             "data_offsets).")
        end = max(end, offsets[1])
    return end
