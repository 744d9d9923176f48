"""Names a user gives that become one component of a path: checked before anything is written.

A channel name becomes part of a file name (`<plate>_<well>_s1_<channel>.tif`), a feature-set
name a folder (`embeddings/<set>/`) and file names (`profiles/<set>.h5ad`,
`tables/<analysis>__<set>__<table>.parquet`). A name holding a path separator or `..` would
write outside the output folder (`synth.channels=[DNA, ../../outside/x]` wrote `x.tif` four
folders up, creating folders to get there). `safe_component` refuses such a name, naming the
setting it came from; `component_problem` says what is wrong (for config checks that collect
every problem first).
"""

from __future__ import annotations

import unicodedata

from celldino.errors import DataError

MAX_BYTES = 200  # a file name is at most 255 bytes on common filesystems; leave room for affixes


class UnsafeNameError(DataError):
    """A name that would not stay one path component inside its folder."""


def component_problem(name: object) -> str | None:
    """Why `name` cannot be a path component, or None when it can."""
    if not isinstance(name, str):
        return f"{name!r} is a {type(name).__name__}, not text"
    if not name.strip():
        return "an empty name"
    for ch in name:
        if ch in "/\\":
            return f"{name!r} holds the path separator {ch!r}"
        if unicodedata.category(ch) in ("Cc", "Zl", "Zp"):
            return f"{name!r} holds the control character {ch!r}"
    if ".." in name or name == ".":
        return f"{name!r} holds '..' (or is '.'), which names a folder, not a file"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        return f"{name[:20]!r}... is longer than {MAX_BYTES} bytes"
    return None


def safe_component(name: object, setting: str) -> str:
    """`name` itself when it can be one path component (no / or \\, no '..', no control
    characters, not empty, at most MAX_BYTES bytes); else UnsafeNameError naming `setting`."""
    problem = component_problem(name)
    if problem:
        raise UnsafeNameError(
            f"{setting}: {problem}; this name becomes part of a file or folder name, so it may "
            "hold no / or \\, no '..' and no control characters: rename it"
        )
    return name  # type: ignore[return-value]
