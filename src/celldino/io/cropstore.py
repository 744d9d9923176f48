"""The single-cell crop store: one chunked Zarr array (N, C, H, W) plus a Parquet index.

Crops are appended one image (site) at a time. After the pixels of a site are written, its index
rows go to `parts/<n>.parquet` and the ledger `ledger.json` (written atomically) records the
site's key and its rows [start, start + count). The ledger is the truth: on reopening, the array
is cut back to the ledger's length and sites already in it are skipped, so a run killed at any
point and rerun ends with every cell exactly once. `finalize()` joins the parts into
`cells.parquet` (row i = crop i).

Readers of a finished store: `open_crops`, `crop_channels` and `read_crops` (crops by row), and
queries over `cells.parquet` run by DuckDB (`cells_columns`, `count_cells`, `cells_per`,
`sample_rows_per_group`, `rows_of_cells`): counts and samples without loading the whole table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from celldino.errors import UserError
from celldino.io.files import read_json, write_json
from celldino.io.tables import write_parquet

CROPS = "crops.zarr"
CELLS = "cells.parquet"
LEDGER = "ledger.json"
PARTS = "parts"


class CropStoreError(UserError, RuntimeError):
    """A crop store that does not match what is being written into it."""


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
            self.ledger = read_json(ledger_path)
            if self.ledger.get("fingerprint") != settings_fingerprint:
                raise CropStoreError(
                    f"{self.dir} holds crops made with other settings "
                    f"(fingerprint {self.ledger.get('fingerprint')} != {settings_fingerprint}); "
                    "use a new prepare.out_dir or delete the old one"
                )
            self.array = zarr.open_array(str(self.dir / CROPS), mode="r+")
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
            )
            write_json(ledger_path, self.ledger)
        self.array.attrs.update(
            {"channels": self.channels, "crop_size": self.crop_size, **(attrs or {})}
        )
        self._done = {s["key"] for s in self.ledger["sites"]}

    @property
    def n_cells(self) -> int:
        return int(self.ledger["n"])

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
        if extra_attrs:
            self.array.attrs.update(extra_attrs)
        write_parquet(cells, self.dir / CELLS)
        self.ledger["done"] = True
        write_json(self.dir / LEDGER, self.ledger)
        return cells


def open_crops(prep_dir: str | Path):
    """The crop array of a prepared folder (read-only zarr.Array)."""
    import zarr

    path = Path(prep_dir) / CROPS
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `celldino prepare` first")
    return zarr.open_array(str(path), mode="r")


def crop_channels(prep_dir: str | Path) -> list[str]:
    """The channel names of a crop store, in the order of the array's second axis."""
    arr = open_crops(prep_dir)
    return [str(c) for c in arr.attrs.get("channels", [f"ch{i}" for i in range(arr.shape[1])])]


def read_crops(prep_dir: str | Path, rows: Any) -> np.ndarray:
    """The crops (n, C, H, W) of the given rows of cells.parquet, in the store's dtype."""
    return np.asarray(open_crops(prep_dir).oindex[np.asarray(rows, dtype=np.int64)])


def read_cells(prep_dir: str | Path) -> pd.DataFrame:
    """cells.parquet whole: row i describes crop i."""
    return pd.read_parquet(_cells(prep_dir))


def _cells(prep_dir: str | Path) -> Path:
    path = Path(prep_dir) / CELLS
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `celldino prepare` first")
    return path


def _quote(column: str) -> str:
    return '"' + column.replace('"', '""') + '"'


def _query(prep_dir: str | Path, sql: str, **params: Any) -> pd.DataFrame:
    """Run `sql` with DuckDB; `cells` in it is cells.parquet with its row numbers (`file_row_number`)."""
    import duckdb

    src = "read_parquet($cells_path, file_row_number = true)"
    con = duckdb.connect()
    try:
        return con.execute(
            sql.replace("{cells}", src), {"cells_path": str(_cells(prep_dir)), **params}
        ).df()
    finally:
        con.close()


def cells_columns(prep_dir: str | Path) -> list[str]:
    """The column names of cells.parquet (read from its schema)."""
    import pyarrow.parquet as pq

    return list(pq.read_schema(_cells(prep_dir)).names)


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
