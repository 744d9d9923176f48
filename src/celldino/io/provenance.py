"""What a stage read and where it writes: one mechanism every stage uses.

Two questions every writer answers the same way, so that a check added here holds everywhere:

* `refuse_overwriting_inputs(outputs, inputs, stage)`: may this stage write these paths? Refused
  (`OutputError`, naming both settings and paths) when an output is one of the stage's inputs
  (compared after resolving links, and by inode where both exist), when an output lies inside an
  input folder (it would change that folder's files, or be read back as an input on a rerun), or
  when an input lies inside an output folder the stage owns (and may clear).
  Used by prepare, extract, profile, evaluate and report.

* `record(paths)` / `changed(recorded, paths)`: the input files a stage read, each file's path,
  size, modification time and, up to `HASH_LIMIT`, content hash (never the bytes of a large
  file: screens are terabytes), and later the phrases saying which of them changed, appeared or
  went away since; a file rewritten with the same bytes is no change. Folders are expanded into
  their files (hidden files, such as locks and writers' temporary files, left out). `celldino run`
  keeps one record per stage in pipeline.json and reruns a stage whose inputs changed, saying
  what changed; prepare describes its changed image files with `describe_changes` (its own
  record of the load-data table and every image lives in the prep folder, `inputs.parquet`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from celldino.errors import OutputError
from celldino.io.files import file_fingerprint

PathLike = str | os.PathLike


def _real(p: PathLike) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.fspath(p))))


def _same(a: PathLike, b: PathLike) -> bool:
    if _real(a) == _real(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links, bind mounts
    except OSError:
        return False


def _inside(child: PathLike, folder: PathLike) -> bool:
    """True when `child` lies strictly inside `folder` (after resolving links)."""
    c, f = _real(child), _real(folder)
    return c != f and f in c.parents


def _items(paths: Mapping[str, PathLike | Iterable[PathLike]]) -> list[tuple[str, Path]]:
    out = []
    for label, value in paths.items():
        values = [value] if isinstance(value, (str, os.PathLike)) else list(value)
        out += [(label, Path(v)) for v in values if str(v)]
    return out


def refuse_overwriting_inputs(
    outputs: Mapping[str, PathLike | Iterable[PathLike]],
    inputs: Mapping[str, PathLike | Iterable[PathLike]],
    stage: str,
    *,
    owned: Iterable[PathLike] = (),
) -> None:
    """Refuse (OutputError) a stage whose outputs would replace or mix with its own inputs.

    `outputs` and `inputs` map the setting (or description) that names them to a path or a list
    of paths. An output that is an input, or lies inside an input folder, is refused; so is an
    input inside one of the `owned` output folders (folders the stage clears or replaces).
    Nothing is written or read beyond `stat`.
    """
    outs, ins = _items(outputs), _items(inputs)
    for o_label, o in outs:  # the worst first: an output that is an input
        for i_label, i in ins:
            if _same(o, i):
                raise OutputError(
                    f"{stage}: {o_label}={o} is also its input {i_label}={i}; writing it would "
                    f"replace the input. Choose another {o_label} (nothing was written)"
                )
    for o_label, o in outs:
        for i_label, i in ins:
            if i.is_dir() and _inside(o, i):
                raise OutputError(
                    f"{stage}: {o_label}={o} lies inside the input folder {i_label}={i}; "
                    "writing there would change that folder's files (or be read as an input on "
                    f"a rerun). Choose a {o_label} outside it (nothing was written)"
                )
    for folder in owned:
        for i_label, i in ins:
            if _same(i, folder) or _inside(i, folder):
                raise OutputError(
                    f"{stage}: the input {i_label}={i} lies inside the output folder {folder}, "
                    f"which {stage} writes and clears; move the input out or choose another "
                    "output folder (nothing was written)"
                )


# ---- input records --------------------------------------------------------------------------


def _files(paths: Iterable[PathLike]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            out += sorted(
                f
                for f in p.rglob("*")
                if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
        else:
            out.append(p)
    return list(dict.fromkeys(out))


# files up to this size also get a content hash, so one rewritten with the same bytes (an
# upstream stage that was resumed or redone and came to the same result) is not a change
HASH_LIMIT = 256 << 20


def _stat(f: Path) -> list[int]:
    try:
        st = f.stat()
        return [int(st.st_size), int(st.st_mtime_ns)]
    except OSError:
        return [-1, -1]


def _key(f: Path, root: Path | None) -> str:
    """The record's name of `f`: relative to `root` when inside it (a moved or copied run
    folder keeps its record), else the path as given."""
    if root is not None:
        try:
            return f.relative_to(root).as_posix()
        except ValueError:
            pass
    return str(f)


def record(
    paths: Iterable[PathLike],
    root: PathLike | None = None,
    previous: Mapping[str, Iterable] | None = None,
) -> dict[str, list]:
    """{path: [size, mtime_ns, content hash ('' above HASH_LIMIT)]} of every file under `paths`
    (a missing one: [-1, -1, '']); paths inside `root` are recorded relative to it. A file whose
    size and time equal its entry in `previous` keeps that entry's hash (not read again)."""
    base = Path(root) if root is not None else None
    previous = {k: list(v) for k, v in (previous or {}).items()}
    rows: dict[str, list] = {}
    for f in _files(paths):
        key = _key(f, base)
        size, mtime = _stat(f)
        old = previous.get(key, [])
        if old[:2] == [size, mtime] and len(old) > 2:
            digest = old[2]
        else:
            digest = file_fingerprint(f) if 0 <= size <= HASH_LIMIT else ""
        rows[key] = [size, mtime, digest]
    return rows


def describe_changes(
    old: Mapping[str, Iterable],
    new: Mapping[str, Iterable],
    noun: str = "file",
    same: Callable[[str, list, list], bool] | None = None,
) -> list[str]:
    """Phrases naming the files of `new` that differ from `old` (by `same(path, old_entry,
    new_entry)`, default: equal entries): changed, new, and no longer there (two named, then a
    count)."""
    old = {k: list(v) for k, v in old.items()}
    new = {k: list(v) for k, v in new.items()}
    same = same or (lambda _p, a, b: a == b)
    groups = (
        ("changed", sorted(p for p in new if p in old and not same(p, old[p], new[p]))),
        ("new", sorted(p for p in new if p not in old)),
        ("no longer used", sorted(p for p in old if p not in new)),
    )
    parts = []
    for what, paths in groups:
        if paths:
            shown = ", ".join(paths[:2])
            more = f" and {len(paths) - 2} more" if len(paths) > 2 else ""
            parts.append(f"{len(paths)} {noun}(s) {what} ({shown}{more})")
    return parts


def changed(
    recorded: Mapping[str, Iterable] | None,
    paths: Iterable[PathLike],
    root: PathLike | None = None,
) -> list[str]:
    """What changed in the files under `paths` since `recorded` (an earlier `record` with the
    same `root`); [] when nothing did, or when there is no record to compare with. Only a file
    whose time changed but whose size did not is read (to compare its content hash)."""
    if recorded is None:
        return []
    base = Path(root) if root is not None else None
    files = {_key(f, base): f for f in _files(paths)}

    def unchanged(key: str, old: list, now: list) -> bool:
        """Same size, and the same time or (a file rewritten) the same content hash."""
        if old[:1] != now[:1]:
            return False
        if old[1:2] == now[1:2]:
            return True
        digest = old[2] if len(old) > 2 else ""
        return bool(digest) and now[0] >= 0 and file_fingerprint(files[key]) == digest

    now = {key: _stat(f) for key, f in files.items()}
    return describe_changes(recorded, now, same=unchanged)
