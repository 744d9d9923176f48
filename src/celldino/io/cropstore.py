"""The single-cell crop store: one chunked Zarr array (N, C, H, W) plus a Parquet index.

Crops are appended one image (site) at a time. After the pixels of a site are written, its index
rows go to `parts/<n>.parquet` and the ledger `ledger.json` (written atomically) records the
site's key and its rows [start, start + count). The ledger is the truth: on reopening, the array
is cut back to the ledger's length and sites already in it are skipped, so a run killed at any
point and rerun ends with every cell exactly once. `finalize()` joins the parts into
`cells.parquet` (row i = crop i) and records its identity (row count and a hash of the ordered
`Metadata_CellID` column) in the array's attributes.

Readers check what they open: `open_crops` refuses a store whose chunks are not all on disk (a
deleted chunk would read as zeros; only the file names are listed), `check_cells` a cells.parquet
that is not the one the store was written with (reordered, edited, from another prepare), and
`read_rows` names the chunk a damaged file holds. A reopened store whose chunks are missing is cut
back to the sites before the first missing chunk, and those sites are redone.

Readers of a finished store: `open_crops`, `crop_channels` and `read_crops` (crops by row), and
queries over `cells.parquet` run by DuckDB (`cells_columns`, `count_cells`, `cells_per`,
`sample_rows_per_group`, `rows_of_cells`): counts and samples without loading the whole table.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from celldino.errors import DataError, IncompleteInputError, MissingInputError, UserError
from celldino.io.files import read_json, write_json
from celldino.io.tables import write_parquet

CROPS = "crops.zarr"
CELLS = "cells.parquet"
LEDGER = "ledger.json"
PARTS = "parts"
IDENTITY = (
    "cells_identity"  # zarr attribute: {"n": rows, "sha256": hash of the Metadata_CellID order}
)

logger = logging.getLogger(__name__)
# every chunk is written, even all-zero ones: a chunk file that is missing is then always a loss
_ARRAY_CONFIG = {"write_empty_chunks": True}


class CropStoreError(UserError, RuntimeError):
    """A crop store that does not match what is being written into it."""


class CropReadError(DataError):
    """A crop chunk that cannot be decoded. Raised in DataLoader workers too, which torch re-raises
    as `CropReadError("Caught CropReadError in DataLoader worker ... Original Traceback ...")`:
    only the original one-line message is kept."""

    def __init__(self, message: str):
        marker = f"{type(self).__module__}.{type(self).__qualname__}: "
        if message.startswith("Caught ") and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


class CropStore:
    """Append-only, resumable crop store in `prep_dir` (crops.zarr + cells.parquet)."""

    def __init__(
        self,
        prep_dir: str | Path,
        *,
        channels: list[str],
        crop_size: int,
        dtype: Any,
        attrs: dict | None = None,
        chunk_cells: int = 64,
        settings_fingerprint: str = "",
    ):
        import zarr

        self.dir = Path(prep_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / PARTS).mkdir(exist_ok=True)
        self.channels = list(channels)
        self.crop_size = int(crop_size)
        self.dtype = np.dtype(dtype)
        self.fingerprint = settings_fingerprint
        ledger_path = self.dir / LEDGER
        shape = (0, len(self.channels), self.crop_size, self.crop_size)
        if ledger_path.exists() and (self.dir / CROPS).exists():
            self.ledger = read_json(
                ledger_path,
                f"the prep in {self.dir} cannot be resumed: delete that folder and rerun prepare "
                "(the whole prep is redone), or use a new prepare.out_dir",
            )
            if self.ledger.get("fingerprint") != settings_fingerprint:
                raise CropStoreError(
                    f"{self.dir} holds crops made with other settings "
                    f"(fingerprint {self.ledger.get('fingerprint')} != {settings_fingerprint}); "
                    "use a new prepare.out_dir or delete the old one"
                )
            self.array = zarr.open_array(str(self.dir / CROPS), mode="r+", config=_ARRAY_CONFIG)
            self._drop_sites_of_missing_chunks()
            n = self.n_cells
            if self.array.shape[0] != n:  # pixels written after the last ledger entry: drop them
                self.array.resize((n, *self.array.shape[1:]))
        else:
            self.ledger = {"fingerprint": settings_fingerprint, "sites": [], "n": 0, "done": False}
            # chunks (k, C, H, W): k cells per chunk, all channels together
            self.array = zarr.create_array(
                str(self.dir / CROPS),
                shape=shape,
                chunks=(chunk_cells, *shape[1:]),
                dtype=self.dtype,
                fill_value=0,
                overwrite=True,
                config=_ARRAY_CONFIG,
            )
            write_json(ledger_path, self.ledger)
        self.array.attrs.update(
            {"channels": self.channels, "crop_size": self.crop_size, **(attrs or {})}
        )
        self._done = {s["key"] for s in self.ledger["sites"]}

    @property
    def n_cells(self) -> int:
        return int(self.ledger["n"])

    def _drop_sites_of_missing_chunks(self) -> None:
        """Cut the ledger back to the sites before the first chunk missing on disk (a deleted
        chunk would read as zeros): those sites are redone, and cells.parquet goes until then."""
        n = min(self.n_cells, self.array.shape[0])
        missing = missing_chunks(self.array, self.dir / CROPS, n)
        if not missing:
            return
        first = missing[0][0]
        keep = [s for s in self.ledger["sites"] if s["start"] + s["count"] <= first]
        new_n = keep[-1]["start"] + keep[-1]["count"] if keep else 0
        logger.warning(
            "%s: the chunks of cell rows %s are missing (deleted?): redoing the %d sites from "
            "cell row %d on",
            self.dir / CROPS,
            _ranges_text(missing),
            len(self.ledger["sites"]) - len(keep),
            new_n,
        )
        (self.dir / CELLS).unlink(missing_ok=True)  # never a stale finished table
        self.ledger.update({"sites": keep, "n": new_n, "done": False})
        write_json(self.dir / LEDGER, self.ledger)

    def has(self, key: str) -> bool:
        return key in self._done

    def append(
        self, key: str, crops: np.ndarray, index: pd.DataFrame, info: dict | None = None
    ) -> None:
        """Add one site's crops (n, C, H, W) and its n index rows, atomically as one step.

        `info` (JSON) is kept in the ledger with the site (e.g. its normalisation statistics).
        """
        # the caller's invariants (a bug if broken): plain RuntimeError, not a user error
        if key in self._done:
            raise RuntimeError(f"site {key} is already in the store {self.dir}")
        if len(crops) != len(index):
            raise RuntimeError(f"site {key}: {len(crops)} crops but {len(index)} index rows")
        if len(crops) and crops.shape[1:] != self.array.shape[1:]:
            raise RuntimeError(
                f"site {key}: crops {crops.shape[1:]} != store {self.array.shape[1:]}"
            )
        if len(crops) and not np.can_cast(crops.dtype, self.dtype, "safe"):
            # e.g. float [0, 1] pixels into a uint16 store would all become 0
            raise RuntimeError(
                f"site {key}: crops of dtype {crops.dtype} cannot be stored without loss in the "
                f"{self.dtype} store {self.dir / CROPS}"
            )
        start, n = self.n_cells, len(crops)
        if n:
            self.array.resize((start + n, *self.array.shape[1:]))
            self.array[start : start + n] = crops.astype(self.dtype, copy=False)
        part = f"{len(self.ledger['sites']):08d}.parquet"
        write_parquet(index.reset_index(drop=True), self.dir / PARTS / part)
        self.ledger["sites"].append(
            {"key": key, "start": start, "count": n, "part": part, "info": info or {}}
        )
        self.ledger["n"] = start + n
        write_json(self.dir / LEDGER, self.ledger)  # the commit point
        self._done.add(key)

    def finalize(self, extra_attrs: dict | None = None) -> pd.DataFrame:
        """Join the index parts into cells.parquet (row i = crop i) and mark the store done."""
        frames = [pd.read_parquet(self.dir / PARTS / s["part"]) for s in self.ledger["sites"]]
        frames = [f for f in frames if len(f)]
        cells = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        if len(cells) != self.n_cells or self.array.shape[0] != self.n_cells:
            raise CropStoreError(
                f"{self.dir}: index has {len(cells)} rows, ledger {self.n_cells}, "
                f"array {self.array.shape[0]}: the folder was changed by hand; delete it and "
                "prepare again"
            )
        self.array.attrs.update({**(extra_attrs or {}), IDENTITY: cells_identity(cells)})
        write_parquet(cells, self.dir / CELLS)
        self.ledger["done"] = True
        write_json(self.dir / LEDGER, self.ledger)
        return cells


def store_sites(prep_dir: str | Path) -> list[str]:
    """The keys of the sites in a prep folder's crop store, in store order ([] without one)."""
    path = Path(prep_dir) / LEDGER
    if not path.exists():
        return []
    return [str(s["key"]) for s in read_json(path, _redo(prep_dir))["sites"]]


def drop_sites(prep_dir: str | Path, keys: set[str]) -> list[str]:
    """Cut the store back to the sites before the first site in `keys`; returns the keys of
    every site removed (those in `keys` and all after them, which a rerun of prepare redoes).

    The ledger is the truth (as for missing chunks): it is cut back and marked unfinished,
    cells.parquet removed (never a stale finished table) and the array shrunk to the ledger.
    The caller holds the prep folder's write lock. Nothing happens when no site is in `keys`.
    """
    prep = Path(prep_dir)
    path = prep / LEDGER
    if not path.exists():
        return []
    ledger = read_json(path, _redo(prep))
    sites = ledger["sites"]
    first = next((i for i, s in enumerate(sites) if str(s["key"]) in keys), None)
    if first is None:
        return []
    keep = sites[:first]
    new_n = keep[-1]["start"] + keep[-1]["count"] if keep else 0
    (prep / CELLS).unlink(missing_ok=True)
    ledger.update({"sites": keep, "n": new_n, "done": False})
    write_json(path, ledger)  # the commit point: a kill after it leaves a store prepare resumes
    if (prep / CROPS).exists():
        import zarr

        arr = zarr.open_array(str(prep / CROPS), mode="r+", config=_ARRAY_CONFIG)
        if arr.shape[0] > new_n:
            arr.resize((new_n, *arr.shape[1:]))
    return [str(s["key"]) for s in sites[first:]]


def mark_unfinished(prep_dir: str | Path) -> bool:
    """Mark a finished store unfinished (cells.parquet removed, ledger `done` false) so that
    readers refuse it until prepare adds the sites it lacks; True when it was finished."""
    prep = Path(prep_dir)
    path = prep / LEDGER
    if not path.exists():
        return False
    ledger = read_json(path, _redo(prep))
    was = bool(ledger.get("done")) or (prep / CELLS).exists()
    (prep / CELLS).unlink(missing_ok=True)
    if ledger.get("done"):
        ledger["done"] = False
        write_json(path, ledger)
    return was


def _redo(prep_dir: str | Path) -> str:
    return f"rerun `celldino prepare` with prepare.out_dir={prep_dir}"


def _ranges_text(ranges: list[tuple[int, int]], most: int = 4) -> str:
    shown = ", ".join(f"{a}-{b - 1}" for a, b in ranges[:most])
    return shown + (f" and {len(ranges) - most} more chunks" if len(ranges) > most else "")


def _stored_files(path: Path) -> set[str]:
    """The files under a store folder, relative with '/' (a listing: nothing is read)."""
    out = set()
    for root, _dirs, files in os.walk(path):
        rel = os.path.relpath(root, path).replace(os.sep, "/")
        out.update(f if rel == "." else f"{rel}/{f}" for f in files)
    return out


def missing_chunks(arr, path: Path, n_rows: int | None = None) -> list[tuple[int, int]]:
    """Row ranges [start, stop) of the chunks that rows [0, n_rows) need but are not on disk."""
    n = arr.shape[0] if n_rows is None else n_rows
    k = arr.chunks[0]
    if not n or not path.is_dir():
        return []
    have = _stored_files(path)
    rest = (0,) * (arr.ndim - 1)
    return [
        (i * k, min((i + 1) * k, n))
        for i in range(-(-n // k))
        if arr.metadata.encode_chunk_key((i, *rest)) not in have
    ]


def open_crops(prep_dir: str | Path, *, check: bool = True):
    """The crop array of a prepared folder (read-only zarr.Array).

    `check`: refuse a store with chunks missing on disk (`IncompleteInputError`, naming the rows):
    a missing chunk would read as zeros.
    """
    import zarr

    path = Path(prep_dir) / CROPS
    if not path.exists():
        raise MissingInputError(f"{path} not found: run `celldino prepare` first")
    try:
        arr = zarr.open_array(str(path), mode="r")
    except Exception as e:  # unreadable or missing zarr.json
        raise DataError(
            f"{path} cannot be opened as a crop store ({type(e).__name__}: {e}); {_redo(prep_dir)}"
        ) from e
    if check:
        missing = missing_chunks(arr, path)
        if missing:
            raise IncompleteInputError(
                f"{path}: {sum(b - a for a, b in missing)} of {arr.shape[0]} crops are missing "
                f"on disk (the chunks of cell rows {_ranges_text(missing)} were deleted or never "
                f"written); {_redo(prep_dir)}: it redoes their sites"
            )
    return arr


def read_rows(arr, rows: Any, prep_dir: str | Path) -> np.ndarray:
    """`arr.oindex[rows]`; a chunk that cannot be decoded raises `DataError` naming its file."""
    rows = np.asarray(rows, dtype=np.int64)
    try:
        return np.asarray(arr.oindex[rows])
    except UserError:
        raise
    except Exception as e:  # e.g. "Zstd decompression error": a damaged chunk file
        k = arr.chunks[0]
        rest = (0,) * (arr.ndim - 1)
        for c in sorted({int(r) // k for r in rows}):
            try:
                arr[c * k : (c + 1) * k]
            except Exception as e2:
                path = Path(prep_dir) / CROPS
                key = arr.metadata.encode_chunk_key((c, *rest))
                stop = min((c + 1) * k, arr.shape[0])
                raise CropReadError(
                    f"{path}: chunk {key} (cell rows {c * k}-{stop - 1}) cannot be read "
                    f"({type(e2).__name__}: {e2}): the file is damaged; delete {path / key} "
                    f"and {_redo(prep_dir)}: it redoes the sites of a missing chunk"
                ) from e2
        raise e


def crop_channels(prep_dir: str | Path) -> list[str]:
    """The channel names of a crop store, in the order of the array's second axis."""
    arr = open_crops(prep_dir, check=False)
    return [str(c) for c in arr.attrs.get("channels", [f"ch{i}" for i in range(arr.shape[1])])]


def read_crops(prep_dir: str | Path, rows: Any) -> np.ndarray:
    """The crops (n, C, H, W) of the given rows of cells.parquet, in the store's dtype."""
    return read_rows(open_crops(prep_dir), rows, prep_dir)


def cells_identity(cells: pd.DataFrame) -> dict:
    """Row count and sha256 of the ordered `Metadata_CellID` column of a cells table."""
    h = hashlib.sha256()
    if "Metadata_CellID" in cells:
        h.update("\n".join(cells["Metadata_CellID"].astype(str)).encode())
    return {"n": len(cells), "sha256": h.hexdigest()}


def check_cells(prep_dir: str | Path, cells: pd.DataFrame, arr) -> None:
    """Refuse a cells.parquet that is not the one the crop store was written with (`DataError`
    naming both files): rows reordered or edited, or a table of another prepare."""
    prep = Path(prep_dir)
    both = f"{prep / CELLS} does not belong to {prep / CROPS}"
    what = f"the two are from different prepares or were changed by hand; {_redo(prep)}"
    if len(cells) != arr.shape[0]:
        raise DataError(f"{both}: {len(cells)} rows for {arr.shape[0]} crops; {what}")
    recorded = arr.attrs.get(IDENTITY)
    if recorded and recorded.get("sha256") != cells_identity(cells)["sha256"]:
        raise DataError(
            f"{both}: its Metadata_CellID rows are not those (in that order) the crops were "
            f"written with (rows reordered, edited or from another prepare); {what}"
        )


def read_cells(prep_dir: str | Path) -> pd.DataFrame:
    """cells.parquet whole: row i describes crop i."""
    path = _cells(prep_dir)
    try:
        return pd.read_parquet(path)
    except Exception as e:  # truncated or overwritten: pyarrow's ArrowInvalid, OSError
        raise _unreadable(path, e) from e


def _unreadable(path: Path, e: Exception) -> DataError:
    reason = " ".join(str(e).split())[:200]
    return DataError(
        f"{path} cannot be read ({type(e).__name__}: {reason}): damaged or cut short; "
        f"{_redo(path.parent)} to write it again"
    )


def _cells(prep_dir: str | Path) -> Path:
    path = Path(prep_dir) / CELLS
    if not path.exists():
        raise MissingInputError(f"{path} not found: run `celldino prepare` first")
    return path


def _quote(column: str) -> str:
    return '"' + column.replace('"', '""') + '"'


def _query(prep_dir: str | Path, sql: str, **params: Any) -> pd.DataFrame:
    """Run `sql` with DuckDB; `cells` in it is cells.parquet with its row numbers (`file_row_number`)."""
    import duckdb

    src = "read_parquet($cells_path, file_row_number = true)"
    path = _cells(prep_dir)
    con = duckdb.connect()
    try:
        return con.execute(sql.replace("{cells}", src), {"cells_path": str(path), **params}).df()
    except (duckdb.IOException, duckdb.InvalidInputException) as e:
        raise _unreadable(path, e) from e
    finally:
        con.close()


def cells_columns(prep_dir: str | Path) -> list[str]:
    """The column names of cells.parquet (read from its schema)."""
    import pyarrow.parquet as pq

    path = _cells(prep_dir)
    try:
        return list(pq.read_schema(path).names)
    except Exception as e:
        raise _unreadable(path, e) from e


def count_cells(prep_dir: str | Path, *, distinct: list[str] | None = None) -> int:
    """Number of cells, or of distinct combinations of the `distinct` columns."""
    if distinct:
        cols = ", ".join(_quote(c) for c in distinct)
        sql = f"SELECT count(*) AS n FROM (SELECT DISTINCT {cols} FROM {{cells}})"
    else:
        sql = "SELECT count(*) AS n FROM {cells}"
    return int(_query(prep_dir, sql).n[0])


def cells_per(prep_dir: str | Path, column: str) -> pd.DataFrame:
    """Cells per value of `column` (as text, sorted): index `column`, one column `cells`."""
    q = _quote(column)
    return _query(
        prep_dir,
        f"SELECT CAST({q} AS VARCHAR) AS {q}, count(*) AS cells FROM {{cells}} GROUP BY 1 ORDER BY 1",
    ).set_index(column)


def sample_rows_per_group(prep_dir: str | Path, column: str, k: int) -> pd.DataFrame:
    """`k` random cells per value of `column`, chosen inside DuckDB: columns `row` (row of
    cells.parquet = crop index) and `label` (the value as text), sorted by row."""
    q = _quote(column)
    return _query(
        prep_dir,
        f"SELECT file_row_number AS row, CAST({q} AS VARCHAR) AS label FROM ("
        f"SELECT *, row_number() OVER (PARTITION BY {q} ORDER BY hash(file_row_number)) AS k "
        "FROM {cells}) WHERE k <= $k ORDER BY row",
        k=int(k),
    )


def rows_of_cells(
    prep_dir: str | Path,
    ids: list[str],
    *,
    label: str | None = None,
    id_column: str = "Metadata_CellID",
) -> pd.DataFrame:
    """The rows of the cells with the given ids: index `id` (text), column `row` (+ `label`, the
    value of the `label` column as text)."""
    q = _quote(id_column)
    extra = f", CAST({_quote(label)} AS VARCHAR) AS label" if label else ""
    return _query(
        prep_dir,
        f"SELECT file_row_number AS row, CAST({q} AS VARCHAR) AS id{extra} FROM {{cells}} "
        f"WHERE CAST({q} AS VARCHAR) IN (SELECT unnest($ids))",
        ids=[str(i) for i in ids],
    ).set_index("id")
