"""The files of a prepared folder beside the crop store: names, readers and writers.

`prepare` writes, besides `cells.parquet` + `crops.zarr` (`celldino.io.cropstore`):
`qc.parquet` (one row per image: `QC_*` metrics and boolean `QC_Flag_*` flags),
`skipped.parquet` (images left out with `prepare.on_error=skip`: file, reason),
`engineered.parquet` (CellProfiler's measurements per cell: `Nuclei_*`, `Cells_*`,
`Cytoplasm_*`), `images.parquet` (the image set with QC, for the field dataset and reports),
`inputs.parquet` (path, size, mtime_ns of every input file of the last prepare), `prepare.json` (fingerprint, channels, illumination file names,
normalisation statistics) and `illum/<plate>.npy` (illumination functions, (C, H, W) float32).
`celldino qc` (learned QC) adds `field_embeddings.parquet` (one row per field:
`Metadata_Plate/Well/Site/ImageKey` + `femb_####` + `noise_<channel>`, with its identity in the Parquet key-value
metadata `celldino`) and its `QC_Learned_*` columns to qc.parquet (`write_qc`).
These tables are small (one row per image) or read by the profile stage through DuckDB; the
readers load them whole.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd

from celldino.io.files import atomic_write_bytes

QC = "qc.parquet"
SKIPPED = "skipped.parquet"
ENGINEERED = "engineered.parquet"
IMAGES = "images.parquet"
INPUTS = "inputs.parquet"
STATE = "prepare.json"
ILLUM = "illum"
FIELD_EMBEDDINGS = "field_embeddings.parquet"
FEMB_PREFIX = "femb_"
NOISE_PREFIX = "noise_"  # field_embeddings.parquet: each channel's pixel noise

__all__ = [
    "ENGINEERED",
    "FEMB_PREFIX",
    "FIELD_EMBEDDINGS",
    "NOISE_PREFIX",
    "ILLUM",
    "IMAGES",
    "INPUTS",
    "QC",
    "SKIPPED",
    "STATE",
    "read_illumination",
    "read_engineered",
    "read_field_embeddings",
    "read_images",
    "read_inputs",
    "read_qc",
    "read_skipped",
    "write_field_embeddings",
    "write_illumination",
    "write_images",
    "write_qc",
]


def read_qc(prep_dir: str | Path) -> pd.DataFrame:
    """The image QC table of a prepared folder (one row per image)."""
    return pd.read_parquet(Path(prep_dir) / QC)


def write_qc(qc: pd.DataFrame, prep_dir: str | Path) -> Path:
    """Write qc.parquet atomically (readers never see half a file); the caller holds the prep's
    write lock (`celldino.io.lock.output_lock`)."""
    from celldino.io.tables import write_parquet

    return write_parquet(qc, Path(prep_dir) / QC)


def write_images(images: pd.DataFrame, prep_dir: str | Path) -> Path:
    """Write images.parquet atomically (prepare, and `celldino qc` updating its QC columns)."""
    from celldino.io.tables import write_parquet

    return write_parquet(images, Path(prep_dir) / IMAGES)


def write_field_embeddings(df: pd.DataFrame, prep_dir: str | Path, identity: dict) -> Path:
    """Write field_embeddings.parquet atomically, with `identity` (JSON) in its metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[b"celldino"] = json.dumps(identity, sort_keys=True).encode()
    buf = io.BytesIO()
    pq.write_table(table.replace_schema_metadata(meta), buf)
    return atomic_write_bytes(Path(prep_dir) / FIELD_EMBEDDINGS, buf.getvalue())


def read_field_embeddings(prep_dir: str | Path, *, identity: bool = False):
    """The field embeddings table of a prep folder (None when there is none); with `identity`,
    (table, identity dict), or None when the file cannot be read (a cache: recomputed). Without
    `identity` an unreadable file is an `IncompleteInputError` naming it."""
    import pyarrow.parquet as pq

    from celldino.errors import IncompleteInputError

    path = Path(prep_dir) / FIELD_EMBEDDINGS
    if not path.exists():
        return None
    try:
        table = pq.read_table(path)
    except Exception as e:  # truncated, not Parquet
        if identity:
            return None
        raise IncompleteInputError(
            f"{path} cannot be read ({type(e).__name__}: {e}); run `celldino qc` again to "
            "recompute it"
        ) from None
    df = table.to_pandas()
    if not identity:
        return df
    try:
        ident = json.loads((table.schema.metadata or {}).get(b"celldino", b"{}"))
    except ValueError:
        ident = {}
    return df, ident


def read_skipped(prep_dir: str | Path) -> pd.DataFrame:
    """The images prepare skipped (file, reason); empty when none were."""
    return pd.read_parquet(Path(prep_dir) / SKIPPED)


def read_engineered(prep_dir: str | Path) -> pd.DataFrame:
    """The engineered features of a prepared folder: one row per cell (`Metadata_*` and
    `Metadata_CellID`, then CellProfiler's `Nuclei_*`, `Cells_*`, `Cytoplasm_*` measurements)."""
    return pd.read_parquet(Path(prep_dir) / ENGINEERED)


def read_images(prep_dir: str | Path) -> pd.DataFrame:
    """The image set of a prepared folder with its QC columns (one row per image)."""
    return pd.read_parquet(Path(prep_dir) / IMAGES)


def read_inputs(prep_dir: str | Path) -> pd.DataFrame:
    """Path, size and mtime_ns of every input file of the last prepare."""
    return pd.read_parquet(Path(prep_dir) / INPUTS)


def write_illumination(functions: dict[str, np.ndarray], folder: Path) -> dict[str, str]:
    """Write illum/<plate>.npy per plate; returns {plate: file name}."""
    folder.mkdir(parents=True, exist_ok=True)
    names = {}
    for i, (plate, fn) in enumerate(functions.items()):
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in plate) or f"plate{i}"
        if safe in {n[:-4] for n in names.values()}:
            safe = f"{safe}_{i}"
        buf = io.BytesIO()
        np.save(buf, fn.astype(np.float32))
        atomic_write_bytes(folder / f"{safe}.npy", buf.getvalue())
        names[plate] = f"{safe}.npy"
    return names


def read_illumination(folder: Path, names: dict[str, str]) -> dict[str, np.ndarray]:
    """The illumination functions {plate: (C, H, W) float32} listed in prepare.json."""
    return {plate: np.load(folder / name) for plate, name in names.items()}
