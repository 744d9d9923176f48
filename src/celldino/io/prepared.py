"""The tables of a prepared folder beside the crop store: names and readers.

`prepare` writes, besides `cells.parquet` + `crops.zarr` (`celldino.io.cropstore`):
`qc.parquet` (one row per image: `QC_*` metrics and boolean `QC_Flag_*` flags),
`skipped.parquet` (images left out with `prepare.on_error=skip`: file, reason) and
`engineered.parquet` (CellProfiler-like features per cell, `CP_*`). These tables are small (one
row per image) or read by the profile stage through DuckDB; `read_qc` and `read_skipped` load
them whole.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

QC = "qc.parquet"
SKIPPED = "skipped.parquet"
ENGINEERED = "engineered.parquet"

__all__ = ["ENGINEERED", "QC", "SKIPPED", "read_qc", "read_skipped"]


def read_qc(prep_dir: str | Path) -> pd.DataFrame:
    """The image QC table of a prepared folder (one row per image)."""
    return pd.read_parquet(Path(prep_dir) / QC)


def read_skipped(prep_dir: str | Path) -> pd.DataFrame:
    """The images prepare skipped (file, reason); empty when none were."""
    return pd.read_parquet(Path(prep_dir) / SKIPPED)
