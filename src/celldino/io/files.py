"""Small file primitives shared by every writer: atomic writes and content fingerprints."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from celldino.errors import IncompleteInputError, OutputError

# errno values of a write that failed because of the folder or the disk, not a bug
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
_HINTS = {
    errno.ENOSPC: "free disk space or choose another folder",
    errno.EDQUOT: "free space in your quota or choose another folder",
    errno.EFBIG: "choose a filesystem that takes larger files",
    errno.EROFS: "choose a writable folder",
    errno.EACCES: "choose a folder you can write to",
    errno.EPERM: "choose a folder you can write to",
}


def current_umask() -> int:
    """The process umask, read without changing it (Linux /proc), else by a set-and-restore."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write to a temporary file beside `path`, then rename: readers never see half a file.

    The file gets the mode a plain `open()` would give (0666 less the umask), not mkstemp's 0600,
    so colleagues sharing a group on a server can read results as they can read everything else.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.errno in WRITE_ERRNOS and not isinstance(e, OutputError):
            raise write_error(path, e) from None  # a full disk names the file, not a traceback
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def write_json(path: Path, obj: Any) -> Path:
    return atomic_write_text(
        Path(path), json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"
    )


def read_json(path: Path, fix: str = "") -> Any:
    """A JSON file's content. A file that is not JSON (cut off by a crash or a full disk, or
    edited by hand) raises `IncompleteInputError` naming it and saying `fix` (what to do;
    default: restore or delete it)."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        where = (
            f" at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        )
        raise IncompleteInputError(
            f"{path} is not valid JSON ({getattr(e, 'msg', None) or e.reason}{where}): it is "
            f"truncated or damaged; {fix or 'restore it from a backup, or delete it and rerun'}"
        ) from None


def read_yaml(path: Path) -> Any:
    """A YAML file's content (safe loader: plain data only)."""
    import yaml

    return yaml.safe_load(Path(path).read_text())


def append_jsonl(path: Path, record: dict[str, Any]) -> Path:
    """Append `record` as one JSON line (a log that grows while a stage runs)."""
    path = Path(path)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    return path


def fingerprint(obj: Any) -> str:
    """Stable short hash of a JSON-serialisable object (config sections, options)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_fingerprint(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes (first 16 hex digits)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:16]


def require_writable(folder: str | Path, setting: str) -> Path:
    """Create `folder` if needed and prove a file can be created in it, before a stage computes
    anything; else an OutputError naming the folder and the setting that chose it.

    A probe file, not `os.access`: root ignores mode bits but not read-only mounts or immutable
    folders, and the probe sees both.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".celldino-probe-"):
            pass
    except OSError as e:
        raise OutputError(
            f"cannot write to {folder} ({e.strerror or e}): choose a writable folder with "
            f"{setting}=... or fix its permissions"
        ) from None
    return folder


def _with_errno(code: int | None, err: OutputError) -> OutputError:
    """`err` carrying the errno of the failed write, for callers that test `e.errno`."""
    err.errno = code
    return err


def write_error(path: str | Path, e: OSError, *, what: str = "file") -> OutputError:
    """The one-line OutputError of a failed write of `path` (disk full, read-only, ...); one
    already (from `atomic_write_bytes`) is returned as it is."""
    if isinstance(e, OutputError):
        return e
    hint = _HINTS.get(e.errno or 0, "check the folder")
    err = OutputError(
        f"cannot write {what} {path}: {e.strerror or e}; {hint}. What was there before is kept "
        "unchanged"
    )
    return _with_errno(e.errno, err)
