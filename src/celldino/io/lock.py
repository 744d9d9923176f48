"""One writer per output folder: an advisory lock held while a stage writes it.

`with output_lock(folder, "extract"):` takes an exclusive `flock` on `<folder>/.celldino.lock`
and records who holds it (stage, pid, host, command, start time). A second writer gets an
`OutputError` naming the holder instead of mixing its files with the first one's. The kernel drops
the lock when the holder exits, so a crashed run never leaves a folder locked (the file stays,
with the last holder's details, and is reused). The dot-name keeps it out of Parquet datasets.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from celldino.errors import OutputError

LOCK_NAME = ".celldino.lock"
_held: dict[str, int] = {}  # folder → depth, so a stage may re-enter its own lock


def _holder_text(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "another process"
    return (
        f"'{info.get('stage', '?')}' (pid {info.get('pid', '?')} on {info.get('host', '?')}, "
        f"since {info.get('started', '?')}: {info.get('command', '')})"
    )


@contextlib.contextmanager
def output_lock(folder: str | Path, stage: str) -> Iterator[Path]:
    """Hold the write lock of `folder` (created if missing) for the body of the `with`."""
    folder = Path(folder)
    key = str(folder.resolve())
    if _held.get(key):
        _held[key] += 1
        try:
            yield folder
        finally:
            _held[key] -= 1
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise OutputError(
            f"{stage}: cannot write to {folder} ({e.strerror}); choose a writable output folder"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(
                f"{stage}: {folder} is being written by {_holder_text(path)}; wait for it to "
                "finish or stop it, or write to another folder"
            ) from None
        info = {
            "stage": stage,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv)[:300],
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        _held[key] = 1
        try:
            yield folder
        finally:
            _held.pop(key, None)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
