"""The embeddings folder: Parquet shards, a manifest, and optionally an AnnData file.

Layout of `extract.out_dir`:
- `part-00000.parquet`, `part-00001.parquet`, ...: shard k holds rows [k·S, (k+1)·S) of the
  cells (or images) table, S = `shard_size`: every `Metadata_*` column, then `emb_0000`... float32
  (or float16). Each shard is written atomically, so a shard on disk is always whole; a rerun
  skips the shards already there (the unit of resuming, and of work split across torchrun ranks).
- `_manifest.json` (`celldino.io.embeddings`; underscore: Parquet readers skip it): checkpoint fingerprint, feature options, channel order, data fingerprint,
  the shard plan and `complete`. A rerun whose manifest identity differs is refused.
- `embeddings.h5ad` (format h5ad): the same table as AnnData (X float32, obs = `Metadata_*`).
- `attention.zarr` (attention_cells): see `celldino.io.attention_store`.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from celldino.io.embeddings import (
    LEGACY_MANIFEST,
    MANIFEST,
    read_manifest,  # noqa: F401  (re-exported)
    require_complete,
    shard_name,
    write_manifest,  # noqa: F401  (re-exported for the extractor)
)
from celldino.io.files import atomic_write_bytes

H5AD = "embeddings.h5ad"
EMB_PREFIX = "emb_"
DTYPES = ("float32", "float16")
# manifest entries that must agree for a rerun to continue an existing folder
IDENTITY = ("checkpoint", "features", "channels", "data", "n_features", "dtype", "shard_size")


def feature_names(n: int) -> list[str]:
    return [f"{EMB_PREFIX}{i:04d}" for i in range(n)]


def shard_plan(n_rows: int, shard_size: int) -> list[tuple[int, int]]:
    """[(start, stop)] row ranges of the shards of an `n_rows` table."""
    if shard_size < 1:
        raise ValueError(f"extract.shard_size must be at least 1, not {shard_size}")
    return [(s, min(s + shard_size, n_rows)) for s in range(0, n_rows, shard_size)]


def write_shard(path: Path, meta: pd.DataFrame, emb: np.ndarray, dtype: str = "float32") -> Path:
    """Atomically write one shard: `meta` (n rows of Metadata_*) + emb (n, F) as emb_* columns."""
    if len(meta) != len(emb):
        raise ValueError(f"{path}: {len(meta)} metadata rows but {len(emb)} embeddings")
    table = pa.Table.from_pandas(meta.reset_index(drop=True), preserve_index=False)
    emb = np.ascontiguousarray(emb, dtype=np.dtype(dtype))  # (n, F)
    for name, col in zip(feature_names(emb.shape[1]), emb.T):
        table = table.append_column(name, pa.array(col))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return atomic_write_bytes(Path(path), buf.getvalue())


def shard_rows(path: Path) -> int:
    """Rows in a shard file (-1 when unreadable)."""
    try:
        return pq.read_metadata(path).num_rows
    except (OSError, pa.ArrowException):
        return -1


def done_shards(out_dir: Path, plan: list[tuple[int, int]]) -> set[int]:
    """Indices of planned shards already on disk with the expected number of rows."""
    out = set()
    for k, (start, stop) in enumerate(plan):
        p = Path(out_dir) / shard_name(k)
        if p.exists() and shard_rows(p) == stop - start:
            out.add(k)
    return out


def identity_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable list of identity entries on which two manifests differ."""
    diffs = []
    for key in IDENTITY:
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            for sub in sorted(set(a) | set(b)):
                if a.get(sub) != b.get(sub):
                    diffs.append(f"{key}.{sub}: {a.get(sub)!r} → {b.get(sub)!r}")
        else:
            diffs.append(f"{key}: {a!r} → {b!r}")
    return diffs


def clear_outputs(out_dir: Path) -> None:
    """Remove what an earlier extraction wrote into `out_dir` (shards, manifest, h5ad, attention)."""
    import shutil

    out_dir = Path(out_dir)
    for p in out_dir.glob("part-*.parquet"):
        p.unlink()
    for name in (MANIFEST, LEGACY_MANIFEST, H5AD):
        (out_dir / name).unlink(missing_ok=True)
    if (out_dir / "attention.zarr").exists():
        shutil.rmtree(out_dir / "attention.zarr")


def read_embeddings(out_dir: str | Path) -> pd.DataFrame:
    """All shards of a finished embeddings folder as one table, in the order of the cells table
    (an unfinished or partly missing folder raises `IncompleteInputError` / `MissingInputError`,
    see `celldino.io.embeddings.require_complete`)."""
    manifest = require_complete(out_dir)
    return _read_shards(Path(out_dir), len(manifest["shards"]))


def _read_shards(out_dir: Path, n: int) -> pd.DataFrame:
    frames = [pd.read_parquet(out_dir / shard_name(k)) for k in range(n)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def write_anndata(out_dir: Path, manifest: dict[str, Any]) -> Path:
    """embeddings.h5ad from the shards: X (cells, F) float32, obs = Metadata_*, uns = manifest."""
    import json

    import anndata as ad

    from celldino.io.profiles import write_h5ad

    df = _read_shards(Path(out_dir), len(manifest["shards"]))  # before `complete` is set
    feats = [c for c in df.columns if c.startswith(EMB_PREFIX)]
    X = df[feats].to_numpy(dtype=np.float32)  # (N, F)
    obs = df.drop(columns=feats).reset_index(drop=True)
    obs.index = obs.index.astype(str)
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(feats, dtype=str)))
    params = {k: manifest[k] for k in ("checkpoint", "features", "channels", "data")}
    adata.uns["celldino"] = {"steps": [{"step": "extract", "params": params}]}
    adata.uns["manifest_json"] = json.dumps(manifest, default=str)
    return write_h5ad(adata, Path(out_dir) / H5AD)
