"""What a stage read and where it writes: the one provenance mechanism every stage uses.

A check added here holds for every stage. Each stage keeps only its own decision (prepare starts
afresh, extract and train refuse, profile and evaluate recompute, `celldino run` reruns a stage).

* `refuse_overwriting_inputs(outputs, inputs, stage)`: may this stage write these paths? Refused
  (`OutputError`, naming both settings and paths) when an output is one of the stage's inputs
  (compared after resolving links, and by inode where both exist), when an output lies inside an
  input folder (it would change that folder's files, or be read back as an input on a rerun), or
  when an input lies inside an output folder the stage owns (and may clear).
  Used by prepare, train, extract, profile, evaluate and report.

* Content keys, for a stage that keys its results by what its inputs hold: `digest(path)` (a
  file's bytes, or every file of a folder; a file's digest is `io.files.file_fingerprint`) and
  `table_digest(table)` (a table as read: columns, types, every cell). A content change is seen
  even when the size and modification time were kept. Used by prepare (load-data and locations
  tables), train (`--resume`: the prep's cell table), extract (the checkpoint and the prep's
  cell table, in the manifest's identity), evaluate (each feature set's file) and `celldino run`
  (the evaluation spec, epoch checkpoints).

* Records, for a stage that says which of many files changed: `record(paths)` is {path: [size,
  modification time in ns, content hash]} of every file under `paths` (folders expanded, hidden
  files such as locks and writers' temporary files left out); the hash is taken up to
  `hash_up_to` bytes (never the bytes of a screen's images: terabytes), and a file whose size and
  time equal its entry in `previous` keeps that entry's hash. `changed(recorded, paths)` and
  `describe_changes(old, new)` give the phrases naming the files that changed, appeared or went
  away (a file rewritten with the same bytes is no change where a hash was recorded);
  `describe_table_changes(old, new)` the phrase naming the first changed row and column of a
  table. Used by prepare (every image and mask file, in `inputs.parquet`), profile (the files of
  its aggregation cache, in the cache), and `celldino run` (the files each stage read, in
  pipeline.json).

* `read_run_record(path)`: pipeline.json, checked to be a run record (`celldino run`, `report`).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat as stat_mod
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celldino.errors import IncompleteInputError, OutputError
from celldino.io.files import file_fingerprint, fingerprint, read_json

if TYPE_CHECKING:
    import pandas as pd

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


# ---- the files under some paths -------------------------------------------------------------


def _listing(
    paths: Iterable[PathLike], expand: bool = True
) -> list[tuple[Path, os.stat_result | None]]:
    """(file, its stat or None when missing) of every file under `paths`, each once, in order:
    a folder is expanded into its files (sorted; hidden ones, such as locks and writers'
    temporary files, left out), or with `expand=False` kept as one entry (a Zarr image).
    One `stat` per file (screens have millions)."""
    out: dict[Path, os.stat_result | None] = {}
    for p in paths:
        p = Path(p)
        try:
            st = p.stat()
        except OSError:
            out.setdefault(p, None)  # missing: recorded as such, named when it matters
            continue
        if not expand or not stat_mod.S_ISDIR(st.st_mode):
            out.setdefault(p, st)
            continue
        for f in sorted(p.rglob("*")):
            if any(part.startswith(".") for part in f.relative_to(p).parts):
                continue
            try:
                fst = f.stat()
            except OSError:
                continue
            if stat_mod.S_ISREG(fst.st_mode):
                out.setdefault(f, fst)
    return list(out.items())


def files(paths: Iterable[PathLike]) -> list[Path]:
    """Every file under `paths` (folders expanded, hidden files left out; a missing path is
    kept), each once, in order."""
    return [f for f, _ in _listing(paths)]


# ---- content keys ---------------------------------------------------------------------------


def digest(path: PathLike) -> str:
    """Short content hash of a file (`io.files.file_fingerprint`: sha256 of its bytes, 16 hex
    digits) or of a folder (every file's name relative to it and its bytes). Sees a change of
    content even when size and modification time were kept; reads every byte."""
    path = Path(path)
    if not path.is_dir():
        return file_fingerprint(path)
    return fingerprint(
        [[f.relative_to(path).as_posix(), file_fingerprint(f)] for f in files([path])]
    )


def table_digest(table: pd.DataFrame) -> str:
    """Short hash of a table's content as read: its columns, their types and every cell."""
    import pandas as pd

    h = hashlib.sha256(json.dumps([[str(c), str(t)] for c, t in table.dtypes.items()]).encode())
    h.update(pd.util.hash_pandas_object(table.astype(str), index=False).to_numpy().tobytes())
    return h.hexdigest()[:16]


# ---- records: which files, how big, when written, what content -------------------------------

# files up to this size also get a content hash, so one rewritten with the same bytes (an
# upstream stage that was resumed or redone and came to the same result) is not a change
HASH_LIMIT = 256 << 20


def _key(f: Path, root: Path | None) -> str:
    """The record's name of `f`: relative to `root` when inside it (a moved or copied run
    folder keeps its record), else the path as given."""
    if root is not None:
        try:
            return f.relative_to(root).as_posix()
        except ValueError:
            pass
    return str(f)


def _size_time(st: os.stat_result | None) -> list[int]:
    return [int(st.st_size), int(st.st_mtime_ns)] if st is not None else [-1, -1]


def record(
    paths: Iterable[PathLike],
    root: PathLike | None = None,
    previous: Mapping[str, Iterable] | None = None,
    *,
    hash_up_to: int = HASH_LIMIT,
    expand: bool = True,
) -> dict[str, list]:
    """{path: [size, mtime_ns, content hash]} of every file under `paths` (a missing one:
    [-1, -1, '']), in order; paths inside `root` are recorded relative to it. The hash ('' when
    not taken) is taken of files up to `hash_up_to` bytes (-1: of none, only `stat`); a file
    whose size and time equal its entry in `previous` keeps that entry's hash (not read again).
    `expand=False`: a folder among `paths` is one entry, its own `stat` (prepare's images: a
    Zarr image is one input, as prepare has always recorded it)."""
    base = Path(root) if root is not None else None
    previous = {k: list(v) for k, v in (previous or {}).items()}
    rows: dict[str, list] = {}
    for f, st in _listing(paths, expand):
        key = _key(f, base)
        size, mtime = _size_time(st)
        old = previous.get(key, [])
        if old[:2] == [size, mtime] and len(old) > 2:
            digest_ = old[2]
        else:
            regular = st is not None and stat_mod.S_ISREG(st.st_mode)  # not a kept folder
            digest_ = file_fingerprint(f) if regular and size <= hash_up_to else ""
        rows[key] = [size, mtime, digest_]
    return rows


def stat_digest(recorded: Mapping[str, Iterable]) -> str:
    """Short hash of a record's paths, sizes and times (not the contents): equal for equal
    listings. Prepare keeps it as its `images` input fingerprint."""
    blob = "\n".join(
        f"{p}\t{int(e[0])}\t{int(e[1])}" for p, e in ((p, list(e)) for p, e in recorded.items())
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _unchanged(old: list, new: list) -> bool:
    """The same size, and the same time or (rewritten) the same recorded content hash."""
    if old[:1] != new[:1]:
        return False
    if old[1:2] == new[1:2]:
        return True
    a, b = (old[2] if len(old) > 2 else ""), (new[2] if len(new) > 2 else "")
    return bool(a) and a == b


def describe_changes(
    old: Mapping[str, Iterable],
    new: Mapping[str, Iterable],
    noun: str = "file",
    same: Callable[[str, list, list], bool] | None = None,
    name: Callable[[str], str] | None = None,
) -> list[str]:
    """Phrases naming the files of `new` that differ from `old` (two records): changed (by
    `same(path, old_entry, new_entry)`; default: the same size, and the same time or the same
    recorded content hash), new, and no longer there; two named (as `name(path)`, default the
    path), then a count."""
    old = {k: list(v) for k, v in old.items()}
    new = {k: list(v) for k, v in new.items()}
    same = same or (lambda _p, a, b: _unchanged(a, b))
    name = name or str
    groups = (
        ("changed", sorted(p for p in new if p in old and not same(p, old[p], new[p]))),
        ("new", sorted(p for p in new if p not in old)),
        ("no longer used", sorted(p for p in old if p not in new)),
    )
    parts = []
    for what, paths in groups:
        if paths:
            shown = ", ".join(name(p) for p in paths[:2])
            more = f" and {len(paths) - 2} more" if len(paths) > 2 else ""
            parts.append(f"{len(paths)} {noun}(s) {what} ({shown}{more})")
    return parts


def changed(
    recorded: Mapping[str, Iterable] | None,
    paths: Iterable[PathLike],
    root: PathLike | None = None,
    *,
    noun: str = "file",
) -> list[str]:
    """What changed in the files under `paths` since `recorded` (an earlier `record` with the
    same `root`); [] when nothing did, or when there is no record to compare with. Only a file
    whose time changed but whose size did not is read (to compare its recorded content hash)."""
    if recorded is None:
        return []
    base = Path(root) if root is not None else None
    listing = {_key(f, base): (f, st) for f, st in _listing(paths)}

    def same(key: str, old: list, now: list) -> bool:
        if old[:1] != now[:1]:
            return False
        if old[1:2] == now[1:2]:
            return True
        digest_ = old[2] if len(old) > 2 else ""  # rewritten: compare contents, if recorded
        return bool(digest_) and now[0] >= 0 and file_fingerprint(listing[key][0]) == digest_

    now = {key: _size_time(st) for key, (_, st) in listing.items()}
    return describe_changes(recorded, now, noun, same=same)


def describe_table_changes(
    old: pd.DataFrame, new: pd.DataFrame, where: Callable[[int], str] | None = None
) -> str:
    """One phrase saying how table `new` differs from `old` (as read): columns added or removed,
    the row count, or the first changed cell (`where(row)` names the row, default 'row N') with
    its old and new value and how many cells changed."""
    import numpy as np

    where = where or (lambda r: f"row {r}")
    added = [c for c in new.columns if c not in old.columns]
    removed = [c for c in old.columns if c not in new.columns]
    parts = []
    if added:
        parts.append(f"column(s) added {added[:5]}")
    if removed:
        parts.append(f"column(s) removed {removed[:5]}")
    if len(old) != len(new):
        parts.append(f"{len(old)} → {len(new)} rows")
    else:
        common = [c for c in new.columns if c in old.columns]
        a = old[common].astype(str).reset_index(drop=True)
        b = new[common].astype(str).reset_index(drop=True)
        diff = (a != b).to_numpy()
        n = int(diff.sum())
        if n:
            r, c = np.argwhere(diff)[0]
            col = common[c]
            parts.append(
                f"{where(int(r))}, {col}: {a.at[r, col]!r} → {b.at[r, col]!r}"
                + (f" ({n} cells changed)" if n > 1 else "")
            )
    return "; ".join(parts) or "content changed"


# ---- the run record -------------------------------------------------------------------------


def read_run_record(path: PathLike, fix: str, *, stages: bool = True) -> dict[str, Any]:
    """pipeline.json, the record `celldino run` keeps of each stage (fingerprint, the files it
    read): a JSON object (with a 'stages' object when `stages`), else `IncompleteInputError`
    naming the file and saying `fix`."""
    record = read_json(Path(path), fix)
    if not isinstance(record, dict) or (stages and not isinstance(record.get("stages", {}), dict)):
        raise IncompleteInputError(
            f"{path} is JSON but not a celldino run record (an object with 'stages'): it was "
            f"edited or replaced; {fix}"
        )
    return record
