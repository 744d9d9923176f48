"""The files of a prepared folder beside the crop store: names, readers and writers.

`prepare` writes, besides `cells.parquet` + `crops.zarr` (`celldino.io.cropstore`):
`qc.parquet` (one row per image: `QC_*` metrics and boolean `QC_Flag_*` flags),
`skipped.parquet` (images left out with `prepare.on_error=skip`: file, reason),
`engineered.parquet` (CellProfiler's measurements per cell: `Nuclei_*`, `Cells_*`,
`Cytoplasm_*`), `images.parquet` (the image set with QC, for the field dataset and reports),
`inputs.parquet` (path, size, mtime_ns of every input file of the last prepare), `prepare.json` (fingerprint, channels, illumination file names,
normalisation statistics) and `illum/<plate>.npy` (illumination functions, (C, H, W) float32).
These tables are small (one row per image) or read by the profile stage through DuckDB; the
readers load them whole.
"""

from __future__ import annotations

import io
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

__all__ = [
    "ENGINEERED",
    "ILLUM",
    "IMAGES",
    "INPUTS",
    "QC",
    "SKIPPED",
    "STATE",
    "read_illumination",
    "read_engineered",
    "read_images",
    "read_inputs",
    "read_qc",
    "read_skipped",
    "write_illumination",
]


def read_qc(prep_dir: str | Path) -> pd.DataFrame:
    """The image QC table of a prepared folder (one row per image)."""
    return pd.read_parquet(Path(prep_dir) / QC)


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
