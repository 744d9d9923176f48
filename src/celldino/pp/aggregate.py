"""Cells → profiles, out of core: one DuckDB query over the Parquet shards.

DuckDB streams the shards (`read_parquet([...])`), keeps one running aggregate per group and
spills to disk beyond `memory_limit`, so memory stays bounded whatever the number of cells.
`levels` adds intermediate groupings (cell → site → well): each level aggregates the previous
one, so every site weighs the same in its well. Metadata columns that are constant within every
group (compound, dose, batch, ...) are carried along; those that vary (cell ids, centres) are not.
"""

from __future__ import annotations

import functools
import glob
import logging
import os
import re
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
from celldino.io.tables import (
    TEXT_COLUMN,
    check_unique_names,
    csv_header,
    csv_separator,
    row_label,
)
from celldino.log import get_logger, progress
from celldino.pp.steps import record

logger = get_logger(__name__)

COUNT_COLUMN = "Metadata_Count_Cells"
PARTITION_BYTES = 256e6  # median: feature bytes (as float64) per in-memory partition
_NUMERIC = (  # DuckDB numeric type names (prefixes): signed, unsigned and DECIMAL(p, s)
    *("FLOAT", "DOUBLE", "REAL", "DECIMAL"),
    *("INTEGER", "BIGINT", "SMALLINT", "TINYINT", "HUGEINT"),
    *("UINTEGER", "UBIGINT", "USMALLINT", "UTINYINT", "UHUGEINT"),
)


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
        # metadata and file names as text, as written (io.tables.read_table reads them so too):
        # DuckDB's sniffer would make the plate 000123 the number 123
        types = ", ".join(f"'{_lit(c)}': 'VARCHAR'" for c in _duck_text_names(tuple(files)))
        # split as read_table splits (Excel's ';'): DuckDB's sniffer would guess per file
        delim = f"delim='{_lit(_separator(files))}'"
        return (
            f"read_csv(?, union_by_name=true, {delim}, types={{{types}}})"
            if types
            else f"read_csv(?, union_by_name=true, {delim})"
        )
    return "read_parquet(?, union_by_name=true)"


def _separator(files: list[str]) -> str:
    """The one separator of the CSV inputs (`io.tables.csv_separator`); DuckDB reads them all
    with one, so files written with two are refused naming one of each. Each header is read
    once per file state (size, time), as the columns are: every query builds its reader."""
    seps = dict(zip(files, _separators_of(_stamps(files))))
    if len(set(seps.values())) > 1:
        a, b = ({s: f for f, s in seps.items()}[s] for s in sorted(set(seps.values()))[:2])
        raise DataError(
            f"profile inputs are separated two ways: {a} by {seps[a]!r} and {b} by {seps[b]!r}; "
            "save them with one separator (or as Parquet)"
        )
    return next(iter(seps.values()))


def _duck_text_names(files: tuple[str, ...]) -> list[str]:
    """The text columns (`TEXT_COLUMN`) as DuckDB names them: its names are case-insensitive, so
    the second of `Metadata_plate_map_name` and `Metadata_Plate_Map_Name` is `..._1`."""
    seen: dict[str, int] = {}
    out = []
    for c in _union_columns(files):
        n = seen.get(c.lower(), 0)
        seen[c.lower()] = n + 1
        if TEXT_COLUMN.match(c):
            out.append(c if n == 0 else f"{c}_{n}")
    return out


def _lit(text: str) -> str:
    return text.replace("'", "''")


def _stamps(files) -> tuple[tuple[str, int, int], ...]:
    """(file, mtime_ns, size) of each file: the key of what is cached of its header."""
    stamps = []
    for f in files:
        try:
            st = os.stat(f)
            stamps.append((f, st.st_mtime_ns, st.st_size))
        except OSError:
            stamps.append((f, 0, 0))
    return tuple(stamps)


def _union_columns(files: tuple[str, ...]) -> list[str]:
    """Every file's columns, in order, each once (a name repeated within a file is refused)."""
    return list(_union_columns_of(_stamps(files)))


@functools.lru_cache(maxsize=32)
def _separators_of(stamps: tuple[tuple[str, int, int], ...]) -> tuple[str, ...]:
    return tuple(csv_separator(f) for f, _, _ in stamps)


@functools.lru_cache(maxsize=32)
def _union_columns_of(stamps: tuple[tuple[str, int, int], ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(c for f, _, _ in stamps for c in _file_columns(f)))


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
    """A file's column names as written; a name repeated in its header is refused (DuckDB would
    keep both, the second as X_1, and a feature would count twice)."""
    try:
        if table_kind(path) == "csv":
            sep = csv_separator(path)
            names = csv_header(path, sep)
            if pd.read_csv(path, sep=sep, nrows=1, dtype=str, encoding_errors="replace").empty:
                raise DataError(  # (said before: features=infer found no feature column)
                    f"{path}: a header line and no data rows: 0 cells to aggregate"
                )
        else:
            import pyarrow.parquet as pq

            names = list(pq.read_schema(path).names)
    except DataError:
        raise
    except Exception as e:  # unreadable: named here, as DuckDB would
        raise DataError(f"cannot read {path}: {type(e).__name__}: {e}".splitlines()[0]) from e
    check_unique_names(names, str(path))
    return names


def check_text_features(con: duckdb.DuckDBPyConnection, files: list[str], cols: dict) -> None:
    """A text column holding numbers and some text (`n/a`; CSV, or a Parquet string column) is
    refused naming the column, file and line: it would silently not be a feature (read_table's
    rule). A column of text only is a label, not a feature."""
    text = [c for c, t in cols.items() if t == "VARCHAR" and not TEXT_COLUMN.match(c)]
    if not text:
        return
    parts = []
    for c in text:
        num = f"TRY_CAST({_q(c)} AS DOUBLE)"
        parts += [f"count({num})", f"count({_q(c)}) - count({num})"]
    try:
        counts = con.execute(
            f"SELECT {', '.join(parts)} FROM {_reader(files)}", [duck_paths(files)]
        ).fetchone()
    except duckdb.Error as e:
        raise DataError(f"cannot read {_where(files)}: {e}".splitlines()[0]) from e
    for k, c in enumerate(text):
        n_num, n_text = counts[2 * k], counts[2 * k + 1]
        if n_num and n_text:
            _refuse_text_cell(files, c, n_text)


def _refuse_text_cell(files: list[str], column: str, n_text: int) -> None:
    from celldino.io.tables import _not_a_number

    for f in files:
        if column not in _file_columns(f):
            continue
        if table_kind(f) == "csv":
            values = pd.read_csv(
                f,
                sep=csv_separator(f),
                usecols=[column],
                dtype=str,
                keep_default_na=False,
                na_values=[""],
            )[column]
        else:
            values = pd.read_parquet(f, columns=[column])[column]
        bad = _not_a_number(values)
        if bad.any():
            i = int(bad.to_numpy().nonzero()[0][0])
            raise DataError(
                f"{row_label(f, i)}: column {column} holds {values.iloc[i]!r}, not a number"
                + (f" ({n_text} such cells in the input)" if n_text > 1 else "")
                + "; a feature column must hold numbers: write a missing value as an empty "
                "cell (or NaN), fix the cell, or remove the column"
            )
    raise DataError(  # (a name DuckDB changed: the cell cannot be located, the column can)
        f"{_where(files)}: column {column} holds {n_text} text cell(s) among numbers; a feature "
        "column must hold numbers: write a missing value as an empty cell (or NaN)"
    )


def _names(files: list[str], duck: list[str]) -> dict[str, str]:
    """DuckDB name → the file's own name. DuckDB's column names are case-insensitive, so of
    `Metadata_plate_map_name` and `Metadata_Plate_Map_Name` it renames the second `..._1`;
    the profiles keep the names the files hold."""
    orig = list(_union_columns(tuple(files)))
    out = {d: d for d in duck}
    if len(orig) == len(duck):
        for d, o in zip(duck, orig):
            if d != o and d.lower().startswith(o.lower()):
                out[d] = o
    return out


# Feature families `features="infer"` knows. CellProfiler's compartments are matched as
# pycytominer's `infer_cp_features` matches them (its default compartments, title case, the
# column name starting with the compartment: celldino's engineered features are these too);
# `CP_` is the engineered features of celldino before issue 12, `emb_` its embeddings.
FAMILIES: dict[str, tuple[str, ...]] = {
    "CellProfiler": ("Cells", "Cytoplasm", "Nuclei"),
    "engineered": ("CP_",),
    "embeddings": ("emb_",),
}
INFER = "infer"
# CellProfiler's measurement modules, the first word of a column in a per-object CSV export
# (Nuclei.csv: AreaShape_Area, Intensity_MeanIntensity_DNA, ...), where the compartment is the file
_CP_MEASUREMENTS = (
    "AreaShape_",
    "Intensity_",
    "Texture_",
    "Granularity_",
    "RadialDistribution_",
    "Correlation_",
    "Neighbors_",
)


def _present(columns: Sequence[str]) -> list[str]:
    """The `_CP_MEASUREMENTS` prefixes the columns use, in that order."""
    return [p for p in _CP_MEASUREMENTS if any(c.startswith(p) for c in columns)]


def _numeric(t: str) -> bool:
    return t.upper().startswith(_NUMERIC)


def _prefixes(columns: Sequence[str]) -> str:
    """'Cells_ (153), Nuclei_ (163), ...': the non-metadata column prefixes, for messages."""
    counts: dict[str, int] = {}
    for c in columns:
        if not c.startswith("Metadata_"):
            head = c.split("_", 1)[0] + ("_" if "_" in c else "")
            counts[head] = counts.get(head, 0) + 1
    return ", ".join(f"{p} ({n})" for p, n in list(counts.items())[:12]) or "none"


# an input column that counts what each row aggregated: the row is a profile already
# (celldino's Metadata_Count_Cells, pycytominer's Metadata_Object_Count, Metadata_Count_*, ...)
_COUNT_LIKE = re.compile(r"(?i)metadata_(\w+_)?(object_?)?count(_\w+)?")
# cytotable writes the image table's metadata as Image_Metadata_Plate, Image_Metadata_Well, ...
_IMAGE_METADATA = "Image_Metadata_"


def input_names(
    files: list[str], cols: dict[str, str] | None = None, orig: dict[str, str] | None = None
) -> dict[str, str]:
    """DuckDB column name → the name it has in the profiles: the file's own name (`_names`),
    and cytotable's `Image_Metadata_X` read as `Metadata_X` when the table has no `Metadata_X`
    (so profile.by=Metadata_Plate,Metadata_Well and the evaluation's roles find them)."""
    cols = cols if cols is not None else schema(files)
    names = dict(orig if orig is not None else _names(files, list(cols)))
    have = {n.lower() for n in names.values()}
    for d, n in names.items():
        alias = "Metadata_" + n[len(_IMAGE_METADATA) :]
        if n.startswith(_IMAGE_METADATA) and alias.lower() not in have:
            names[d] = alias
            have.add(alias.lower())
            logger.info("%s: column %s read as %s (cytotable's name)", _where(files), n, alias)
    return names


def count_columns(names: Sequence[str]) -> list[str]:
    """The columns that say a row aggregates several (Metadata_Count_Cells, ...Object_Count)."""
    return [n for n in names if _COUNT_LIKE.fullmatch(n)]


def _check_not_mean_of_means(
    con: duckdb.DuckDBPyConnection,
    files: list[str],
    cols: dict[str, str],
    names: dict[str, str],
    by_d: list[str],
    where: str,
) -> None:
    """A table whose rows count what they aggregated (a count column) is taken as profiles only
    when each `by` key is one row; grouping several of its rows would average averages."""
    counted = count_columns([names[c] for c in cols])
    if not counted:
        return
    keys = ", ".join(_q(k) for k in by_d)
    try:
        dup = con.execute(
            f"SELECT {keys}, count(*) AS n FROM {_reader(files)} GROUP BY {keys} "
            "HAVING count(*) > 1 LIMIT 1",
            [duck_paths(files)],
        ).fetchone()
    except duckdb.Error as e:
        raise DataError(f"cannot read {where}: {e}".splitlines()[0]) from e
    if dup is None:
        return
    key = dict(zip([names[k] for k in by_d], dup[:-1]))
    raise DataError(
        f"{where}: has a {counted[0]} column, so its rows are profiles that were aggregated "
        f"already, and {dup[-1]} rows share the keys {key}: grouping them by "
        f"{[names[k] for k in by_d]} would average averages; give the per-cell table, or set "
        "profile.by to keys that are one row each (e.g. add Metadata_Site), or evaluate the "
        "profiles as they are"
    )


def infer_features(columns: dict[str, str]) -> list[str]:
    """The numeric columns of the one feature family the table holds (FAMILIES), in table
    order; refused when it holds none, or several (say which, and how to choose)."""
    found: dict[str, list[str]] = {}
    for c, t in columns.items():
        for family, prefixes in FAMILIES.items():
            if c.startswith(prefixes) and _numeric(t):
                found.setdefault(family, []).append(c)
    if not found:
        per_object = [c for c in columns if c.startswith(_CP_MEASUREMENTS)]
        hint = (
            " (a CellProfiler per-object export names its measurements without the compartment"
            f": give their prefixes, e.g. features={','.join(_present(per_object))})"
            if per_object
            else ""
        )
        raise DataError(
            "features=infer found no feature columns: it knows CellProfiler's compartments "
            "(Cells_, Cytoplasm_, Nuclei_, as pycytominer's infer_cp_features), celldino's "
            f"engineered CP_ and embeddings emb_; the columns' prefixes are {_prefixes(columns)}"
            f"; name the feature columns or prefixes, e.g. features=Cells_,Nuclei_{hint}"
        )
    if len(found) > 1:
        what = " and ".join(f"{f} ({len(cs)} columns)" for f, cs in found.items())
        prefixes = {
            f: ",".join(p + ("_" if f == "CellProfiler" else "") for p in FAMILIES[f])
            for f in found
        }
        raise DataError(
            f"features=infer found two feature families mixed: {what}; name the ones to use, "
            f"e.g. features={next(iter(prefixes.values()))} (or list every family's prefixes "
            "to use them together)"
        )
    return next(iter(found.values()))


def resolve_features(columns: dict[str, str], features: str | Sequence[str] | None) -> list[str]:
    """The feature columns of a table (`columns`: name → DuckDB type).

    None or empty → every numeric non-`Metadata_` column; 'infer' → `infer_features`; else
    each token (a str is one token, or 'a,b' several) is an exact column name if the table has
    one, else a prefix of non-`Metadata_` columns. A token that matches nothing is refused,
    naming it and the prefixes present. Order: token by token, each in table order.
    """
    if isinstance(features, str):
        tokens = [t.strip() for t in features.split(",") if t.strip()]
    else:
        tokens = [str(t).strip() for t in features or () if str(t).strip()]
    if not tokens:
        feats = [c for c, t in columns.items() if not c.startswith("Metadata_") and _numeric(t)]
    elif INFER in tokens:
        if len(tokens) > 1:
            raise DataError(
                f"features {tokens}: 'infer' stands alone; give infer, or the columns / prefixes"
            )
        feats = infer_features(columns)
    else:
        feats, unmatched = [], []
        for tok in tokens:
            hit = (
                [tok]
                if tok in columns
                else [c for c in columns if c.startswith(tok) and not c.startswith("Metadata_")]
            )
            if not hit:
                unmatched.append(tok)
            feats += hit
        if unmatched:
            raise DataError(
                f"no feature columns match {', '.join(map(repr, unmatched))} (as a column name "
                f"or a prefix); the columns' prefixes are {_prefixes(columns)}"
            )
        feats = list(dict.fromkeys(feats))
    if not feats:
        raise DataError(
            f"no numeric non-Metadata_ feature columns (columns: {list(columns)[:8]}...); "
            "name the features, e.g. features=emb_ or features=Cells_,Nuclei_"
        )
    bad = [f for f in feats if not _numeric(columns[f])]
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

    source: folders, files or globs of Parquet shards (or CSV / CSV.gz tables). features:
    'infer', or column names / prefixes ('a,b' or a list; see `resolve_features`), or None
    (numeric non-`Metadata_` columns). A table whose `by` keys are one row each is taken as
    profiles (identity, logged); one with a count column (`count_columns`) whose keys repeat is
    refused. method: 'mean' or 'median' (interpolated, as pandas). levels: finer
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
    check_text_features(con, files, cols)
    orig = _names(files, list(cols))  # DuckDB name → the file's name
    names = input_names(files, cols, orig)  # ... → the name in the profiles
    to_duck = {o: k for k, o in orig.items()} | {v: k for k, v in names.items()}
    chain = [[to_duck.get(k, k) for k in keys] for keys in chain]
    by_d = chain[-1]
    missing = [k for k in dict.fromkeys(k for keys in chain for k in keys) if k not in cols]
    if missing:
        raise DataError(
            f"{where}: grouping key(s) {[names.get(k, k) for k in missing]} not in the "
            f"columns {[names[c] for c in cols][:12]}...; set profile.by / profile.via"
        )
    try:
        feats = [
            to_duck[f] for f in resolve_features({names[c]: t for c, t in cols.items()}, features)
        ]
    except (KeyError, ValueError, TypeError) as e:
        raise DataError(f"{where}: {e.args[0] if e.args else e}") from None
    _check_not_mean_of_means(con, files, cols, names, by_d, where)
    all_keys = set().union(*map(set, chain))
    keys_in_order = dict.fromkeys(k for keys in chain for k in keys)
    as_feature = [names.get(k, k) for k in keys_in_order if k in feats]
    if as_feature:
        raise DataError(
            f"{where}: grouping key(s) {as_feature} are also feature columns (profile.features "
            "selects them); set profile.by / profile.via to label columns such as Metadata_Well"
        )
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
    empty = df[by_d].isna()
    if bool(empty.to_numpy().any()):  # NULL keys would make one profile of unrelated cells
        col = by_d[int(np.flatnonzero(empty.any(axis=0).to_numpy())[0])]
        n = int(df.loc[empty.any(axis=1), COUNT_COLUMN].sum())
        raise DataError(
            f"{where}: {n} row(s) have no value in {names.get(col, col)} (a key of profile.by / "
            "profile.via): they would be averaged into one profile whatever their well; fill "
            "the empty cells or drop those rows"
        )
    df = df.sort_values(by_d, kind="stable").reset_index(drop=True)

    n_rows = df.pop(COUNT_COLUMN).astype(np.int64)  # input rows in each profile
    identity = bool((n_rows == 1).all())
    kept: list[str] = []
    for m in carry:
        lo, hi = df.pop("__min_" + m), df.pop("__max_" + m)
        same = (lo == hi) | (lo.isna() & hi.isna())
        if bool(same.all()):
            df[m] = lo
            kept.append(m)
    own = next((m for m in kept if names[m].lower() == COUNT_COLUMN.lower()), None)
    if own is not None:  # profiles as input (one row each, checked above): their cell counts
        counts = pd.to_numeric(df.pop(own))
        kept.remove(own)
    elif not identity:
        counts = n_rows
    else:
        counts = None
    if identity:
        logger.info(
            "%s: each of the %d %s keys is one row, so the rows are taken as profiles "
            "(aggregation is the identity)%s",
            where,
            len(df),
            [names[k] for k in by_d],
            f"; their {names[own]} kept" if own else f"; no {COUNT_COLUMN} column (no cell count)",
        )
    if counts is not None:
        df[COUNT_COLUMN] = counts.astype(np.int64)
    count_col = [COUNT_COLUMN] if counts is not None else []
    df = df[by_d + kept + count_col + feats].rename(columns=names)
    feats = [names[f] for f in feats]
    kept = [names[m] for m in kept]
    carry = [names[m] for m in carry]
    adata = frame_to_anndata(df, feats, [names[k] for k in by_d], source=where)
    dropped = [m for m in carry if m not in kept and m.lower() != COUNT_COLUMN.lower()]
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
            "n_cells": int(counts.sum()) if counts is not None else None,
            "identity": identity,
            "carried": kept,
            "memory_limit": memory_limit,
        },
    )
    return adata
