"""One writer per output folder: an advisory lock held while a stage writes it.

`with output_lock(folder, "extract"):` takes an exclusive `flock` on `<folder>/.celldino.lock`
and records who holds it (stage, pid, host, command, start time). A second writer gets an
`OutputError` naming the holder instead of mixing its files with the first one's. The kernel drops
the lock when the holder exits, so a crashed run never leaves a folder locked (the file stays,
with the last holder's details, and is reused). The dot-name keeps it out of Parquet datasets.

`with input_lock(prep, "train"):` takes a shared `flock` on the same file while a stage reads a
folder another stage writes (train and extract read what prepare wrote): any number of readers
at once, but no writer while one reads (the writer is told the folder is being read) and no
reader while a writer writes. Readers leave the file's holder details alone (they belong to the
last writer). An input folder may be read-only: the lock file is then opened read-only, or, when
it does not exist and cannot be made, the folder is read without a lock (nobody can write it).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from celldino.errors import IncompleteInputError, OutputError

logger = logging.getLogger(__name__)

LOCK_NAME = ".celldino.lock"
_held: dict[str, int] = {}  # folder → depth, so a stage may re-enter its own lock
_shared: dict[str, int] = {}  # folder → depth of this process's read locks


# errno of flock on a filesystem without locks (Lustre without -o flock, NFS with nolock, some
# FUSE/SMB mounts): the stage goes on without a lock, with a warning, rather than not at all
_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


def _try_flock(fd: int, op: int, folder: Path, stage: str) -> bool:
    """flock(fd, op | LOCK_NB): True when held, False (with a warning) where the filesystem has
    no locks; BlockingIOError when another process holds a conflicting lock."""
    try:
        fcntl.flock(fd, op | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        raise
    except OSError as e:
        if e.errno not in _NO_LOCKS:
            raise
        logger.warning(
            "%s: the filesystem of %s has no file locks (%s): going on without one, so make "
            "sure no other run writes there meanwhile",
            stage,
            folder,
            e.strerror,
        )
        return False


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
def output_lock(folder: str | Path, stage: str, *, name: str = "") -> Iterator[Path]:
    """Hold the write lock of `folder` (created if missing) for the body of the `with`.

    With `name`, the lock covers only the files `<folder>/<name>*` (profile's outputs of one
    `profile.out` stem): the lock file is `<folder>/.<name>.celldino.lock`, so two writers of
    other names in one folder go on side by side.
    """
    folder = Path(folder)
    key = str(folder.resolve()) + (f"/.{name}" if name else "")
    what = f"{folder / name}*" if name else str(folder)
    if _held.get(key):
        _held[key] += 1
        try:
            yield folder
        finally:
            _held[key] -= 1
        return
    if _shared.get(key):  # flock cannot upgrade this process's own read lock
        raise OutputError(f"{stage}: {folder} is an input this run reads; write to another folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / (f".{name}{LOCK_NAME}" if name else LOCK_NAME)
        created = not path.exists()
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise OutputError(
            f"{stage}: cannot write to {folder} ({e.strerror}); choose a writable output folder"
        ) from None
    try:
        try:
            locked = _try_flock(fd, fcntl.LOCK_EX, folder, stage)
        except BlockingIOError:
            if _only_readers(fd):
                raise OutputError(
                    f"{stage}: {folder} is being read by another process (a train or extract "
                    "reading it); wait for it to finish or stop it, or write to another folder"
                ) from None
            raise OutputError(
                f"{stage}: {what} is being written by {_holder_text(path)}; wait for it to "
                "finish or stop it, or write to another " + ("output name" if name else "folder")
            ) from None
        info = {
            "stage": stage,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv)[:300],
        }
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        except OSError as e:  # a full disk: no empty lock file left behind, one line
            if created:
                path.unlink(missing_ok=True)
            raise OutputError(
                f"{stage}: cannot write the lock file {path} ({e.strerror or e}): free disk "
                f"space in {folder} (or choose another folder) and rerun; nothing was written"
            ) from None
        _held[key] = 1
        try:
            yield folder
        finally:
            _held.pop(key, None)
            if locked:
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _only_readers(fd: int) -> bool:
    """True when the holders of the lock on `fd` are readers only (a shared lock can be had)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    fcntl.flock(fd, fcntl.LOCK_UN)
    return True


@contextlib.contextmanager
def input_lock(folder: str | Path, stage: str) -> Iterator[Path]:
    """Hold a read lock of `folder` for the body of the `with`: no writer may change it meanwhile.

    Refused (`IncompleteInputError`) while a writer holds the folder. Re-entrant, and a no-op in a
    process that holds the folder's write lock itself.
    """
    folder = Path(folder)
    key = str(folder.resolve())
    if _held.get(key) or _shared.get(key):
        _shared[key] = _shared.get(key, 0) + 1
        try:
            yield folder
        finally:
            _shared[key] -= 1
            if not _shared[key]:
                _shared.pop(key)
        return
    path = folder / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        try:
            fd = os.open(path, os.O_RDONLY)  # flock works on a read-only descriptor too
        except OSError as e:
            # a read-only folder without a lock file (or no folder: the reader names it)
            logger.debug("%s: reading %s without a lock (%s)", stage, folder, e.strerror)
            yield folder
            return
    try:
        try:
            locked = _try_flock(fd, fcntl.LOCK_SH, folder, stage)
        except BlockingIOError:
            raise IncompleteInputError(
                f"{stage}: {folder} is being written by {_holder_text(path)}; wait for it to "
                "finish (its result is incomplete until then) or stop it"
            ) from None
        _shared[key] = 1
        try:
            yield folder
        finally:
            _shared.pop(key, None)
            if locked:
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
