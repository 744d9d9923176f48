"""Cells → profiles, out of core: one DuckDB query over the Parquet shards.

DuckDB streams the shards (`read_parquet([...])`), keeps one running aggregate per group and
spills to disk beyond `memory_limit`, so memory stays bounded whatever the number of cells.
`levels` adds intermediate groupings (cell → site → well): each level aggregates the previous
one, so every site weighs the same in its well. Metadata columns that are constant within every
group (compound, dose, batch, ...) are carried along; those that vary (cell ids, centres) are not.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import duckdb
import numpy as np
import pandas as pd

from celldino.io.profiles import frame_to_anndata, shard_paths
from celldino.log import get_logger
from celldino.pp.steps import record

logger = get_logger(__name__)

COUNT_COLUMN = "Metadata_Count_Cells"
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


def schema(files: list[str], con: duckdb.DuckDBPyConnection | None = None) -> dict[str, str]:
    """Column name → DuckDB type of the union of the shards."""
    con = con or duckdb.connect(":memory:")
    rows = con.execute("DESCRIBE SELECT * FROM read_parquet(?, union_by_name=true)", [files])
    return {r[0]: r[1] for r in rows.fetchall()}


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
            raise KeyError(f"feature columns not in the shards: {missing[:5]} ({len(missing)})")
    if not feats:
        raise ValueError(
            f"no feature columns match {features!r} (columns: {list(columns)[:8]}...); "
            "pass features= a prefix such as 'emb_' or an explicit list"
        )
    bad = [f for f in feats if not columns[f].upper().startswith(_NUMERIC)]
    if bad:
        raise TypeError(f"feature columns are not numeric: {bad[:5]} (types {columns[bad[0]]})")
    return feats


def _level_sql(source: str, keys: list[str], cols: list[str], fn: str, carry: list[str]) -> str:
    key_sql = ", ".join(_q(k) for k in keys)
    parts = [key_sql]
    parts += [f"{fn}({_q(c)}) AS {_q(c)}" for c in cols]
    for m in carry:
        parts += [f"min({_q(m)}) AS {_q('__min_' + m)}", f"max({_q(m)}) AS {_q('__max_' + m)}"]
    parts.append(f"count(*) AS {_q(COUNT_COLUMN)}")
    return f"SELECT {', '.join(parts)} FROM {source} GROUP BY {key_sql}"


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
    Returns AnnData with X (n_groups, n_features) and obs holding `by`, carried metadata and
    `Metadata_Count_Cells`. NaN in a cell propagates to its group (see pp.handle_nonfinite).
    """
    if method not in ("mean", "median"):
        raise ValueError(f"method must be 'mean' or 'median', got {method!r}")
    files = shard_paths(source)
    by = list(by)
    chain = [list(k) for k in levels] + [by]
    for finer, coarser in zip(chain[:-1], chain[1:]):
        if not set(coarser) <= set(finer):
            raise ValueError(f"level {finer} must contain every key of the next level {coarser}")
    con = _connect(memory_limit, threads, temp_dir)
    cols = schema(files, con)
    missing = [k for k in set().union(*map(set, chain)) if k not in cols]
    if missing:
        raise KeyError(f"grouping keys {missing} not in the shards (columns: {list(cols)[:8]}...)")
    feats = resolve_features(cols, features)
    all_keys = set().union(*map(set, chain))
    if carry is None:
        carry = [c for c in cols if c.startswith("Metadata_") and c not in all_keys]
    carry = [c for c in carry if c not in all_keys]
    fn = "avg" if method == "mean" else "median"

    # level 0 reads the shards; each further level reads the previous one (a subquery)
    source_sql = "read_parquet(?, union_by_name=true)"
    sql = _level_sql(source_sql, chain[0], feats, fn, carry)
    for keys in chain[1:]:
        inner_carry = [("__min_" + m, "__max_" + m) for m in carry]
        key_sql = ", ".join(_q(k) for k in keys)
        parts = [key_sql] + [f"{fn}({_q(c)}) AS {_q(c)}" for c in feats]
        parts.append(f"sum({_q(COUNT_COLUMN)}) AS {_q(COUNT_COLUMN)}")
        for lo, hi in inner_carry:
            parts += [f"min({_q(lo)}) AS {_q(lo)}", f"max({_q(hi)}) AS {_q(hi)}"]
        sql = f"SELECT {', '.join(parts)} FROM ({sql}) GROUP BY {key_sql}"
    sql += " ORDER BY " + ", ".join(_q(k) for k in by)
    logger.info(
        "aggregating %d shard(s) by %s (%s of %d features, DuckDB memory_limit=%s)",
        len(files), by, method, len(feats), memory_limit,
    )  # fmt: skip
    df = con.execute(sql, [files]).fetchdf()
    con.close()

    kept: list[str] = []
    for m in carry:
        lo, hi = df.pop("__min_" + m), df.pop("__max_" + m)
        same = (lo == hi) | (lo.isna() & hi.isna())
        if bool(same.all()):
            df[m] = lo
            kept.append(m)
    df[COUNT_COLUMN] = df[COUNT_COLUMN].astype(np.int64)
    df = df[by + kept + [COUNT_COLUMN] + feats]
    adata = frame_to_anndata(df, feats)
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
