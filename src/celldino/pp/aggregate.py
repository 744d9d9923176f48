"""Cells → profiles, out of core: one DuckDB query over the Parquet shards.

DuckDB streams the shards (`read_parquet([...])`), keeps one running aggregate per group and
spills to disk beyond `memory_limit`, so memory stays bounded whatever the number of cells.
`levels` adds intermediate groupings (cell → site → well): each level aggregates the previous
one, so every site weighs the same in its well. Metadata columns that are constant within every
group (compound, dose, batch, ...) are carried along; those that vary (cell ids, centres) are not.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import duckdb
import numpy as np
import pandas as pd

from celldino.errors import DataError
from celldino.io.profiles import frame_to_anndata, shard_paths, table_kind
from celldino.log import get_logger, progress
from celldino.pp.steps import record

logger = get_logger(__name__)

COUNT_COLUMN = "Metadata_Count_Cells"
PARTITION_BYTES = 256e6  # median: feature bytes (as float64) per in-memory partition
_NUMERIC = ("FLOAT", "DOUBLE", "REAL", "INTEGER", "BIGINT", "SMALLINT", "TINYINT", "HUGEINT")


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _connect(memory_limit: str, threads: int, temp_dir: str | None) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(":memory:")
    con.execute(f"SET memory_limit = '{memory_limit}'")
    con.execute(f"SET threads = {int(threads) if threads > 0 else os.cpu_count() or 1}")
    con.execute("SET preserve_insertion_order = false")
    try:  # DuckDB >= 1.3 caches file bytes in its buffer pool: no use for one pass over shards
        con.execute("SET enable_external_file_cache = false")
    except duckdb.Error:
        pass
    if sys.stdout.isatty() and logger.isEnabledFor(logging.INFO):
        con.execute("SET enable_progress_bar = true")  # DuckDB's own bar for long queries
    con.execute(f"SET temp_directory = '{temp_dir or tempfile.gettempdir()}/celldino_duckdb'")
    return con


def duck_paths(files: list[str]) -> list[str]:
    """The files as DuckDB reads them: its readers glob every path, so `emb[1]/part-0.parquet`
    would read `emb1/part-0.parquet`; escaped, each path is only itself."""
    return [glob.escape(str(f)) for f in files]


def _reader(files: list[str]) -> str:
    """The DuckDB table function reading every file (Parquet, or CSV / gzipped CSV)."""
    kinds = {table_kind(f) for f in files}
    if len(kinds) > 1:
        raise DataError(
            f"profile inputs mix Parquet and CSV files ({files[0]}, ...); give one kind"
        )
    if kinds == {"csv"}:
        return "read_csv_auto(?, union_by_name=true)"
    return "read_parquet(?, union_by_name=true)"


def _where(files: list[str]) -> str:
    return files[0] if len(files) == 1 else f"{len(files)} files under {Path(files[0]).parent}"


def schema(files: list[str], con: duckdb.DuckDBPyConnection | None = None) -> dict[str, str]:
    """Column name → DuckDB type of the union of the shards (DuckDB's names, see `_names`)."""
    con = con or duckdb.connect(":memory:")
    try:
        rows = con.execute(f"DESCRIBE SELECT * FROM {_reader(files)}", [duck_paths(files)])
    except duckdb.Error as e:
        raise DataError(f"cannot read {_where(files)}: {e}".splitlines()[0]) from e
    return {r[0]: r[1] for r in rows.fetchall()}


def _file_columns(path: str) -> list[str]:
    if table_kind(path) == "csv":
        return [str(c) for c in pd.read_csv(path, nrows=0).columns]
    import pyarrow.parquet as pq

    return list(pq.read_schema(path).names)


def _names(files: list[str], duck: list[str]) -> dict[str, str]:
    """DuckDB name → the file's own name. DuckDB's column names are case-insensitive, so of
    `Metadata_plate_map_name` and `Metadata_Plate_Map_Name` it renames the second `..._1`;
    the profiles keep the names the files hold."""
    orig = list(dict.fromkeys(c for f in files for c in _file_columns(f)))
    out = {d: d for d in duck}
    if len(orig) == len(duck):
        for d, o in zip(duck, orig):
            if d != o and d.lower().startswith(o.lower()):
                out[d] = o
    return out


def resolve_features(columns: dict[str, str], features: str | Sequence[str] | None) -> list[str]:
    """None → every numeric non-`Metadata_` column; a str → that prefix; a list → those names."""
    if features is None:
        feats = [
            c
            for c, t in columns.items()
            if not c.startswith("Metadata_") and t.upper().startswith(_NUMERIC)
        ]
    elif isinstance(features, str):
        feats = [c for c in columns if c.startswith(features)]
    else:
        feats = list(features)
        missing = [f for f in feats if f not in columns]
        if missing:
            raise DataError(f"feature columns not in the shards: {missing[:5]} ({len(missing)})")
    if not feats:
        raise DataError(
            f"no feature columns match {features!r} (columns: {list(columns)[:8]}...); "
            "pass features= a prefix such as 'emb_' or an explicit list"
        )
    bad = [f for f in feats if not columns[f].upper().startswith(_NUMERIC)]
    if bad:
        raise DataError(f"feature columns are not numeric: {bad[:5]} (types {columns[bad[0]]})")
    return feats


def _level_sql(
    source: str, keys: list[str], cols: list[str], fn: str, carry: list[str], null_is_nan=False
) -> str:
    key_sql = ", ".join(_q(k) for k in keys)
    parts = [key_sql]
    # SQL's avg skips NULL: a cell with a NULL feature would silently drop out of its group's
    # mean while Count_Cells still counts it. NULL is NaN here, so profile.nonfinite sees it.
    val = "coalesce(CAST({} AS DOUBLE), 'NaN'::DOUBLE)" if null_is_nan else "{}"
    parts += [f"{fn}({val.format(_q(c))}) AS {_q(c)}" for c in cols]
    for m in carry:
        parts += [f"min({_q(m)}) AS {_q('__min_' + m)}", f"max({_q(m)}) AS {_q('__max_' + m)}"]
    parts.append(f"count(*) AS {_q(COUNT_COLUMN)}")
    return f"SELECT {', '.join(parts)} FROM {source} GROUP BY {key_sql}"


def _mean_sql(chain: list[list[str]], feats: list[str], carry: list[str]) -> str:
    """Level 0 reads the shards; each further level reads the previous one (a subquery)."""
    sql = _level_sql("__READER__", chain[0], feats, "avg", carry, null_is_nan=True)
    for keys in chain[1:]:
        key_sql = ", ".join(_q(k) for k in keys)
        parts = [key_sql] + [f"avg({_q(c)}) AS {_q(c)}" for c in feats]
        parts.append(f"sum({_q(COUNT_COLUMN)}) AS {_q(COUNT_COLUMN)}")
        for m in carry:
            lo, hi = "__min_" + m, "__max_" + m
            parts += [f"min({_q(lo)}) AS {_q(lo)}", f"max({_q(hi)}) AS {_q(hi)}"]
        sql = f"SELECT {', '.join(parts)} FROM ({sql}) GROUP BY {key_sql}"
    return sql


def _median_levels(df: pd.DataFrame, chain: list[list[str]], feats: list[str], carry: list[str]):
    """Medians of one partition (all of its cells in memory), level by level, in pandas."""
    for i, keys in enumerate(chain):
        g = df.groupby(keys, sort=False, dropna=False, observed=True)
        out = g[feats].median().astype(np.float64)
        # pandas' median skips NaN (and NULL, read as NaN): propagate it as the mean does
        has_nan = df[feats].isna().groupby([df[k] for k in keys], sort=False, dropna=False).any()
        out = out.mask(has_nan.reindex(index=out.index, columns=feats).fillna(False).astype(bool))
        out[COUNT_COLUMN] = g.size() if i == 0 else g[COUNT_COLUMN].sum()
        for m in carry:
            lo, hi = (m, m) if i == 0 else ("__min_" + m, "__max_" + m)
            out["__min_" + m] = g[lo].min()
            out["__max_" + m] = g[hi].max()
        df = out.reset_index()
    return df


def _median_by_partition(
    con: duckdb.DuckDBPyConnection,
    files: list[str],
    chain: list[list[str]],
    feats: list[str],
    carry: list[str],
    temp_dir: str | None,
) -> pd.DataFrame:
    """Median is holistic (every value of a group is needed), so DuckDB first splits the cells
    into partitions by a hash of the final keys (one streaming pass, Parquet under `temp_dir`);
    each partition (whole groups, ~256 MB of features) is then reduced in memory with pandas.
    Peak memory ~ the largest partition."""
    n_rows = con.execute(f"SELECT count(*) FROM {_reader(files)}", [duck_paths(files)])
    n_rows = int(n_rows.fetchone()[0])
    n_parts = int(np.clip(np.ceil(n_rows * len(feats) * 8 / PARTITION_BYTES), 1, 512))
    key_hash = f"hash({', '.join(_q(k) for k in chain[-1])}) % {n_parts}"
    cols = list(dict.fromkeys([*chain[0], *carry, *feats]))
    tmp = Path(tempfile.mkdtemp(prefix="celldino_median_", dir=temp_dir))
    try:
        for setting in ("partitioned_write_flush_threshold = 20000",):
            try:
                con.execute(f"SET {setting}")
            except duckdb.Error:
                pass
        sel = ", ".join(_q(c) for c in cols)
        con.execute(
            f"COPY (SELECT {sel}, {key_hash} AS __part "
            f"FROM {_reader(files)}) "
            f"TO '{tmp}' (FORMAT parquet, PARTITION_BY (__part), ROW_GROUP_SIZE 20000)",
            [duck_paths(files)],
        )
        parts = sorted(p for p in tmp.iterdir() if p.is_dir())
        frames = []
        for p in progress(parts, desc="median per partition"):
            cells = con.execute(
                "SELECT * EXCLUDE (__part) FROM read_parquet(?, hive_partitioning=true)",
                [str(p / "*.parquet")],
            ).fetchdf()
            frames.append(_median_levels(cells, chain, feats, carry))
            del cells
        return pd.concat(frames, ignore_index=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def aggregate(
    source: str | Path | Sequence[str | Path],
    *,
    by: Sequence[str] = ("Metadata_Plate", "Metadata_Well"),
    features: str | Sequence[str] | None = None,
    method: str = "mean",
    levels: Sequence[Sequence[str]] = (),
    carry: Sequence[str] | None = None,
    memory_limit: str = "2GB",
    threads: int = 0,
    temp_dir: str | None = None,
) -> ad.AnnData:
    """Aggregate per-cell Parquet shards into profiles grouped by `by`.

    source: folders, files or globs of Parquet shards. features: prefix, list, or None (numeric
    non-`Metadata_` columns). method: 'mean' or 'median' (interpolated, as pandas). levels: finer
    key lists aggregated first, e.g. [["Metadata_Plate", "Metadata_Well", "Metadata_Site"]].
    carry: metadata columns to keep (None: every `Metadata_*` column constant within groups).
    Returns a new AnnData (the one `pp` stage that has no AnnData to modify: it reads files) with
    X (n_groups, n_features) and obs holding `by`, carried metadata and `Metadata_Count_Cells`.
    NaN (or NULL) in a cell propagates to its group (see pp.handle_nonfinite).
    """
    if method not in ("mean", "median"):
        raise DataError(f"aggregation method must be 'mean' or 'median', got {method!r}")
    files = shard_paths(source)
    where = _where(files)
    by = list(by)
    chain = [list(k) for k in levels] + [by]
    for finer, coarser in zip(chain[:-1], chain[1:]):
        if not set(coarser) <= set(finer):
            raise DataError(f"level {finer} must contain every key of the next level {coarser}")
    con = _connect(memory_limit, threads, temp_dir)
    cols = schema(files, con)
    names = _names(files, list(cols))  # DuckDB name → the file's name
    if any(c.lower() == COUNT_COLUMN.lower() for c in cols):
        raise DataError(
            f"{where}: has a {COUNT_COLUMN} column, so it looks like profiles that were "
            "aggregated already, not per-cell rows; aggregate the per-cell shards instead"
        )
    to_duck = {v: k for k, v in names.items()}
    chain = [[to_duck.get(k, k) for k in keys] for keys in chain]
    by_d = chain[-1]
    missing = [k for k in dict.fromkeys(k for keys in chain for k in keys) if k not in cols]
    if missing:
        raise DataError(
            f"{where}: grouping key(s) {[names.get(k, k) for k in missing]} not in the "
            f"columns {[names[c] for c in cols][:12]}...; set profile.by / profile.via"
        )
    if features is not None and not isinstance(features, str):
        features = [to_duck.get(f, f) for f in features]
    try:
        feats = resolve_features(cols, features)
    except (KeyError, ValueError, TypeError) as e:
        raise DataError(f"{where}: {e.args[0] if e.args else e}") from None
    all_keys = set().union(*map(set, chain))
    if carry is None:
        carry = [c for c in cols if names[c].startswith("Metadata_") and c not in all_keys]
    else:
        carry = [to_duck.get(c, c) for c in carry]
    carry = [c for c in carry if c not in all_keys]
    logger.info(
        "aggregating %d file(s) by %s (%s of %d features, DuckDB memory_limit=%s)",
        len(files),
        by,
        method,
        len(feats),
        memory_limit,
    )
    try:
        if method == "mean":
            sql = _mean_sql(chain, feats, carry).replace("__READER__", _reader(files))
            df = con.execute(sql, [duck_paths(files)]).fetchdf()
        else:
            df = _median_by_partition(con, files, chain, feats, carry, temp_dir)
    except duckdb.Error as e:
        raise DataError(f"cannot aggregate {where}: {e}".splitlines()[0]) from e
    finally:
        con.close()
    if df.empty:
        raise DataError(
            f"{where}: 0 rows (cells) to aggregate; the input tables are empty. Check that "
            "extraction wrote cells (its log) and that profile.input names the right folder"
        )
    df = df.sort_values(by_d, kind="stable").reset_index(drop=True)

    kept: list[str] = []
    for m in carry:
        lo, hi = df.pop("__min_" + m), df.pop("__max_" + m)
        same = (lo == hi) | (lo.isna() & hi.isna())
        if bool(same.all()):
            df[m] = lo
            kept.append(m)
    df[COUNT_COLUMN] = df[COUNT_COLUMN].astype(np.int64)
    df = df[by_d + kept + [COUNT_COLUMN] + feats].rename(columns=names)
    feats = [names[f] for f in feats]
    kept = [names[m] for m in kept]
    carry = [names[m] for m in carry]
    adata = frame_to_anndata(df, feats, by, source=where)
    dropped = [m for m in carry if m not in kept]
    if dropped:
        logger.debug("metadata varying within groups, not carried: %s", dropped)
    record(
        adata,
        "aggregate",
        {
            "files": len(files),
            "by": by,
            "levels": [list(k) for k in levels],
            "method": method,
            "n_features": len(feats),
            "n_cells": int(pd.to_numeric(df[COUNT_COLUMN]).sum()),
            "carried": kept,
            "memory_limit": memory_limit,
        },
    )
    return adata
