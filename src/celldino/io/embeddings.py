"""The embeddings folder: Parquet shards, the manifest, and optionally an AnnData file.

Layout of `extract.out_dir`:
- `part-00000.parquet`, `part-00001.parquet`, ...: shard k holds rows [k·S, (k+1)·S) of the
  cells (or images) table, S = `shard_size`: every `Metadata_*` column, then `emb_0000`... float32
  (or float16). Each shard is written atomically, so a shard on disk is always whole; a rerun
  skips the shards already there (the unit of resuming, and of work split across torchrun ranks).
- `_manifest.json`: checkpoint fingerprint, feature options, channel order, data fingerprint, the
  shard plan and `complete`. The leading underscore keeps it out of Parquet readers, so
  `pd.read_parquet(folder)` reads the shards as one dataset. Folders written before the rename
  hold `manifest.json`; both are read.
- `embeddings.h5ad` (format h5ad): the same table as AnnData (X float32, obs = `Metadata_*`).
- `_attention.zarr` (attention_cells; `attention.zarr` up to 0.3.0, still read): see
  `celldino.io.attention_store`.

`profile` and `run` call `require_complete` before using a folder, so a partial extraction is
never aggregated silently. `read_embeddings` reads a finished folder whole; `sample_embeddings`
reads a random sample of the cells of the shards the manifest lists (the report's UMAPs), without
loading the whole folder.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from celldino.errors import IncompleteInputError, MissingInputError
from celldino.io.attention_store import ATTENTION, LEGACY_ATTENTION
from celldino.io.files import atomic_write_bytes, read_json, write_json

MANIFEST = "_manifest.json"
LEGACY_MANIFEST = "manifest.json"
H5AD = "embeddings.h5ad"
EMB_PREFIX = "emb_"


def feature_names(n: int) -> list[str]:
    return [f"{EMB_PREFIX}{i:04d}" for i in range(n)]


def shard_name(k: int) -> str:
    return f"part-{k:05d}.parquet"


def manifest_path(folder: str | Path) -> Path:
    """The manifest of `folder` (the legacy name when only that exists)."""
    folder = Path(folder)
    if not (folder / MANIFEST).exists() and (folder / LEGACY_MANIFEST).exists():
        return folder / LEGACY_MANIFEST
    return folder / MANIFEST


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    p = manifest_path(folder)
    fix = (
        "rerun extract with extract.overwrite=true (--overwrite): it redoes the extraction into "
        f"{Path(folder)}"
    )
    return read_json(p, fix) if p.exists() else None


def write_manifest(folder: str | Path, manifest: dict[str, Any]) -> Path:
    folder = Path(folder)
    (folder / LEGACY_MANIFEST).unlink(missing_ok=True)  # one manifest per folder
    return write_json(folder / MANIFEST, manifest)


def require_complete(folder: str | Path) -> dict[str, Any]:
    """The manifest of a finished extraction with every shard present, or a clear error."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        raise MissingInputError(
            f"{folder}: no {MANIFEST}, so this is not a finished `celldino extract` output; "
            "run or rerun `celldino extract` into it first"
        )
    n = len(manifest.get("shards", []))
    missing = [shard_name(k) for k in range(n) if not (folder / shard_name(k)).exists()]
    if not manifest.get("complete", False) or missing:
        what = (
            f"{len(missing)} of {n} shards are missing (first: {missing[0]})"
            if missing
            else "its manifest says the extraction is incomplete"
        )
        raise IncompleteInputError(
            f"{folder}: {what}; rerun `celldino extract` with the same settings to finish it "
            "(it resumes), or pass profile.allow_partial=true to profile what is there"
        )
    return manifest


def manifest_shards(folder: str | Path) -> list[Path]:
    """The shard files the manifest of `folder` lists that are on disk, in order."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        raise MissingInputError(
            f"{folder}: no {MANIFEST}, so this is not a `celldino extract` output; "
            "run `celldino extract` into it first"
        )
    paths = [folder / shard_name(k) for k in range(len(manifest.get("shards", [])))]
    return [p for p in paths if p.exists()]


def _quote(column: str) -> str:
    return '"' + column.replace('"', '""') + '"'


def sample_embeddings(
    folder: str | Path,
    n: int | None,
    *,
    seed: int = 0,
    columns: list[str] | None = None,
) -> tuple[np.ndarray, pd.DataFrame]:
    """Feature matrix (float32) and `Metadata_*` table of a random sample of `n` cells.

    A reservoir sample drawn by DuckDB while scanning the shards of the manifest: memory stays at
    the sample's size however many cells the screen has. `n=None` reads every cell. `columns`
    keeps only those metadata columns (default: every `Metadata_*` column).
    """
    import duckdb
    import pyarrow.parquet as pq

    files = manifest_shards(folder)
    if not files:
        raise FileNotFoundError(f"no Parquet shards in {folder}")
    names = list(pq.read_schema(files[0]).names)
    meta = [c for c in names if c.startswith("Metadata_")]
    if columns is not None:
        missing = [c for c in columns if c not in meta]
        if missing:
            raise ValueError(f"{folder}: no metadata columns {missing} (have {meta})")
        meta = list(columns)
    feats = [c for c in names if not c.startswith("Metadata_")]
    select = ", ".join(_quote(c) for c in meta + feats) if columns is not None else "*"
    sample = f" USING SAMPLE reservoir({int(n)} ROWS) REPEATABLE ({int(seed)})" if n else ""
    con = duckdb.connect()
    try:
        df = con.execute(
            f"SELECT {select} FROM read_parquet($files){sample}", {"files": [str(f) for f in files]}
        ).df()
    finally:
        con.close()
    meta = [c for c in df.columns if c.startswith("Metadata_")]
    feats = [c for c in df.columns if not c.startswith("Metadata_")]
    return df[feats].to_numpy(np.float32), df[meta]


def write_shard(path: Path, meta: pd.DataFrame, emb: np.ndarray, dtype: str = "float32") -> Path:
    """Atomically write one shard: `meta` (n rows of Metadata_*) + emb (n, F) as emb_* columns."""
    if len(meta) != len(emb):
        raise ValueError(f"{path}: {len(meta)} metadata rows but {len(emb)} embeddings")
    table = pa.Table.from_pandas(meta.reset_index(drop=True), preserve_index=False)
    emb = np.ascontiguousarray(emb, dtype=np.dtype(dtype))  # (n, F)
    for name, col in zip(feature_names(emb.shape[1]), emb.T):
        table = table.append_column(name, pa.array(col))
    buf = io.BytesIO()
    # dictionary-encode the metadata only: an embedding value almost never repeats, so a
    # dictionary page per float column made shards 1.37x larger (docs/benchmarks.md)
    pq.write_table(table, buf, use_dictionary=list(meta.columns.astype(str)))
    return atomic_write_bytes(Path(path), buf.getvalue())


def shard_rows(path: Path) -> int:
    """Rows in a shard file (-1 when unreadable)."""
    try:
        return pq.read_metadata(path).num_rows
    except (OSError, pa.ArrowException):
        return -1


def clear_outputs(out_dir: Path) -> None:
    """Remove what an earlier extraction wrote into `out_dir` (shards, manifest, h5ad, attention)."""
    out_dir = Path(out_dir)
    for p in out_dir.glob("part-*.parquet"):
        p.unlink()
    for name in (MANIFEST, LEGACY_MANIFEST, H5AD):
        (out_dir / name).unlink(missing_ok=True)
    for name in (ATTENTION, LEGACY_ATTENTION):
        if (out_dir / name).exists():
            shutil.rmtree(out_dir / name)


def read_embeddings(out_dir: str | Path) -> pd.DataFrame:
    """All shards of a finished embeddings folder as one table, in the order of the cells table
    (an unfinished or partly missing folder raises `IncompleteInputError` / `MissingInputError`,
    see `celldino.io.embeddings.require_complete`)."""
    manifest = require_complete(out_dir)
    return read_shards(Path(out_dir), len(manifest["shards"]))


def read_shards(out_dir: Path, n: int) -> pd.DataFrame:
    """The first `n` shards of a folder as one table, whether or not the manifest says complete."""
    frames = [pd.read_parquet(out_dir / shard_name(k)) for k in range(n)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
