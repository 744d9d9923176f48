"""Columns and layers `celldino profile` writes into profiles to say which controls fitted a
step, and their one reader, `fitted_marks`. Its own module (numpy and pandas only), so that
`celldino.eval` reads the marks without importing `celldino.pp` and anndata (the GPU machine's
bench/gpu_check.py imports eval without anndata)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from celldino.errors import DataError

FIT_COLUMN = "Metadata_celldino_fit_control"  # bool obs column: this control fitted a step
ACTIVITY_LAYER = "activity"  # profiles fitted on half the controls, for evaluate's activity
ACTIVITY_FIT_COLUMN = "Metadata_celldino_activity_fit"  # bool: this control fitted that layer
_TRUE = {"true", "1", "1.0", "yes"}
_FALSE = {"false", "0", "0.0", "no", "", "nan", "none"}


def fitted_marks(meta: pd.DataFrame, column: str = FIT_COLUMN) -> np.ndarray | None:
    """The `column` marks as bool (n,), or None when the table has no such column. Booleans,
    0/1 and the texts True/False (a CSV's) are read; a missing value is False; anything else is
    refused naming the column and the value."""
    if column not in meta.columns:
        return None
    col = meta[column]
    if pd.api.types.is_bool_dtype(col):
        return col.to_numpy(dtype=bool)
    text = col.astype(object).where(col.notna(), "").astype(str).str.strip().str.lower()
    bad = ~text.isin(_TRUE | _FALSE)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(
            f"column {column} holds {col.iloc[row]!r} (row {row}), expected True/False: it marks "
            "the controls `celldino profile` fitted its steps on; fix or drop the column"
        )
    return text.isin(_TRUE).to_numpy()


__all__ = ["ACTIVITY_FIT_COLUMN", "ACTIVITY_LAYER", "FIT_COLUMN", "fitted_marks"]
