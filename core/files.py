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
import time
from collections.abc import Iterator
from pathlib import Path

# Files that are Python pickles, which run code when they are loaded: refused unread, for base
# models and adapters alike.
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle")
MAX_HEADER_BYTES = 16 * 1024 * 1024  # a LoRA or checkpoint header is kilobytes; anything near this is not one of ours


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` whole or not at all: a temporary file in the same folder, fsync, rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
    return metadata, header
