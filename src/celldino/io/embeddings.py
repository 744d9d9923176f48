"""The embeddings folder's manifest: where it lives and whether the folder is complete.

`extract` writes Parquet shards `part-NNNNN.parquet` and `_manifest.json` (the leading underscore
keeps it out of Parquet readers, so `pd.read_parquet(folder)` reads the shards as one dataset).
Folders written before the rename hold `manifest.json`; both are read. `profile` and `run` call
`require_complete` before using a folder, so a partial extraction is never aggregated silently.
`sample_embeddings` reads a random sample of the cells of the shards the manifest lists (the
report's UMAPs), without loading the whole folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from celldino.errors import IncompleteInputError, MissingInputError
from celldino.io.files import read_json, write_json

MANIFEST = "_manifest.json"
LEGACY_MANIFEST = "manifest.json"


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
    return read_json(p) if p.exists() else None


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
