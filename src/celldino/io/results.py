"""The evaluation's outputs: the tidy metrics table, `summary.json` and the checkpoint spread.

`evaluate` writes `metrics.parquet` and `metrics.csv` (feature_set, analysis, metric, value),
detail tables under `tables/` and `summary.json` (notes, skipped analyses); the report reads them
back here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from celldino.errors import IncompleteInputError
from celldino.io.files import read_json

METRICS = "metrics.parquet"
METRICS_CSV = "metrics.csv"
SUMMARY = "summary.json"
TABLES = "tables"  # <analysis>__<feature set>__<table>.parquet
# The checkpoint-to-checkpoint spread (`celldino run`): the epoch checkpoints' own evaluation
# folder inside the evaluation's, its spread table and the record of what was evaluated.
CHECKPOINTS = "checkpoints"
CHECKPOINT_SPREAD = "checkpoint_spread.parquet"
CHECKPOINT_RECORD = "checkpoint_spread.json"
SPREAD_COLUMNS = [
    "analysis",
    "metric",
    "checkpoint",  # epoch_NNNN, or final (the learned set of the main evaluation)
    "epoch",
    "value",
    "low",  # min over the checkpoints of this metric
    "high",  # max
    "spread",  # high - low
]

__all__ = [
    "CHECKPOINTS",
    "CHECKPOINT_RECORD",
    "CHECKPOINT_SPREAD",
    "METRICS",
    "METRICS_CSV",
    "SUMMARY",
    "SPREAD_COLUMNS",
    "TABLES",
    "list_tables",
    "read_checkpoint_spread",
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
            try:
                return pd.read_parquet(p) if p.suffix == ".parquet" else pd.read_csv(p)
            except (OSError, ValueError) as e:  # cut off (a full disk, a crash) or not a table
                raise IncompleteInputError(
                    f"{p} cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}):"
                    " it is truncated or damaged; rerun evaluate into this folder"
                ) from None
    raise FileNotFoundError(f"no results table in {eval_dir}")


def read_summary(eval_dir: str | Path) -> dict[str, Any] | None:
    """`summary.json` of an evaluation folder, or None when there is none."""
    path = Path(eval_dir) / SUMMARY
    fix = "rerun evaluate into this folder: it rewrites it (finished analyses are kept)"
    return read_json(path, fix) if path.exists() else None


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


def read_checkpoint_spread(folder: str | Path) -> tuple[pd.DataFrame | None, dict[str, Any]]:
    """The checkpoint spread of a run (`eval/checkpoints/`): (the table, or None when there is
    none; the record: `checkpoints` evaluated, or `skipped` with the reason; {} when the
    evaluation ran without it)."""
    folder = Path(folder)
    record = read_json(folder / CHECKPOINT_RECORD) if (folder / CHECKPOINT_RECORD).exists() else {}
    table = folder / CHECKPOINT_SPREAD
    return (pd.read_parquet(table) if table.exists() else None), record
