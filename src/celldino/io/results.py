"""The evaluation's outputs: the tidy metrics table and `summary.json`.

`evaluate` writes `metrics.parquet` and `metrics.csv` (feature_set, analysis, metric, value),
detail tables under `tables/` and `summary.json` (notes, skipped analyses); the report reads them
back here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from celldino.io.files import read_json

METRICS = "metrics.parquet"
METRICS_CSV = "metrics.csv"
SUMMARY = "summary.json"
TABLES = "tables"  # <analysis>__<feature set>__<table>.parquet

__all__ = [
    "METRICS",
    "METRICS_CSV",
    "SUMMARY",
    "TABLES",
    "list_tables",
    "read_results",
    "read_summary",
    "read_table",
]


def read_results(eval_dir: str | Path) -> pd.DataFrame:
    """The evaluation's tidy results table (feature_set × metric → value)."""
    eval_dir = Path(eval_dir)
    for name in (METRICS, METRICS_CSV):
        p = eval_dir / name
        if p.exists():
            return pd.read_parquet(p) if p.suffix == ".parquet" else pd.read_csv(p)
    raise FileNotFoundError(f"no results table in {eval_dir}")


def read_summary(eval_dir: str | Path) -> dict[str, Any] | None:
    """`summary.json` of an evaluation folder, or None when there is none."""
    path = Path(eval_dir) / SUMMARY
    return read_json(path) if path.exists() else None


def list_tables(eval_dir: str | Path) -> pd.DataFrame:
    """The detail tables of an evaluation folder: one row per file (analysis, feature_set,
    table, path), sorted; empty when there are none."""
    rows = []
    for p in sorted((Path(eval_dir) / TABLES).glob("*.parquet")):
        parts = p.stem.split("__")
        if len(parts) == 3:
            rows.append(
                {"analysis": parts[0], "feature_set": parts[1], "table": parts[2], "path": p}
            )
    return pd.DataFrame(rows, columns=["analysis", "feature_set", "table", "path"])


def read_table(path: str | Path) -> pd.DataFrame:
    """One detail table of `tables/`."""
    return pd.read_parquet(path)
