"""Which profiles are negative controls: `pp.annotate` marks them, later steps read the mark."""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd

from celldino.errors import DataError
from celldino.pp.steps import CONTROL_COLUMN, record
from celldino.query import evaluate

Controls = str | tuple[str, object] | Sequence[bool] | np.ndarray | None


def select(obs: pd.DataFrame, controls: Controls, setting: str = "profile.controls") -> np.ndarray:
    """A bool mask (n_obs,) from a selection, a (column, value) pair, or a bool array.

    A selection is text in `celldino.query`'s grammar (`Metadata_pert_type == 'control'`,
    `Metadata_Compound in ['DMSO', 'none']`, joined by and/or/not), evaluated over the columns
    without Python: never `DataFrame.query`, which runs code (`@`, attributes, calls). Refusals
    name `setting`.
    """
    if isinstance(controls, str):
        return evaluate(obs, controls, setting)
    if isinstance(controls, tuple) and len(controls) == 2 and isinstance(controls[0], str):
        column, value = controls
        if column not in obs.columns:
            raise DataError(f"controls column {column!r} not in the metadata {list(obs.columns)}")
        return (obs[column] == value).to_numpy()
    mask = np.asarray(controls, dtype=bool)
    if mask.shape != (len(obs),):
        raise DataError(f"controls mask has shape {mask.shape}, expected ({len(obs)},)")
    return mask


def _values_hint(obs: pd.DataFrame, controls: Controls) -> str:
    """' (Metadata_pert_type has: 'trt', ...)' for the columns the selection names."""
    text = controls[0] if isinstance(controls, tuple) else str(controls)
    named = [c for c in obs.columns if str(c) in text]
    hints = []
    for c in named[:2]:
        vals = pd.unique(obs[c].dropna())[:6]
        hints.append(f"{c} has {', '.join(repr(v) for v in vals)}")
    return f" ({'; '.join(hints)})" if hints else ""


def annotate(adata: ad.AnnData, *, controls: Controls, copy: bool = False) -> ad.AnnData | None:
    """Mark negative controls in obs[`Metadata_celldino_control`].

    Modifies `adata` and returns None; copy=True returns an annotated copy instead.
    """
    if adata.n_obs == 0:
        raise DataError("there are 0 profiles to mark controls in (the input is empty)")
    mask = select(adata.obs, controls)
    if not mask.any():
        raise DataError(
            f"controls {controls!r} match none of the {adata.n_obs} profiles"
            f"{_values_hint(adata.obs, controls)}; fix the controls selection "
            "(profile.controls), or set profile.normalize_reference=all and profile.controls=''"
        )
    adata = adata.copy() if copy else adata
    adata.obs[CONTROL_COLUMN] = mask
    record(
        adata,
        "annotate",
        {
            "controls": controls if isinstance(controls, (str, tuple)) else "mask",
            "n_controls": int(mask.sum()),
        },
    )
    return adata if copy else None


def control_mask(adata: ad.AnnData, controls: Controls = None) -> np.ndarray:
    """Controls given here, else those marked by pp.annotate, else a clear error."""
    if controls is not None:
        return select(adata.obs, controls)
    if CONTROL_COLUMN in adata.obs.columns:
        return adata.obs[CONTROL_COLUMN].to_numpy(dtype=bool)
    raise DataError(
        "no controls found: pass controls=... (a selection such as "
        "\"Metadata_pert_type == 'control'\" or a (column, value) pair) or run pp.annotate first"
    )


def groups(adata: ad.AnnData, by: str | None) -> list[tuple[object, np.ndarray]]:
    """(value, row indices) per value of obs[by]; one group of every row when by is empty."""
    if not by:
        return [(None, np.arange(adata.n_obs))]
    if by not in adata.obs.columns:
        raise DataError(f"group key {by!r} not in the metadata {list(adata.obs.columns)}")
    # factorize keeps a missing value as a group of its own (== never matches NaN)
    codes, uniques = pd.factorize(adata.obs[by], use_na_sentinel=False)
    return [(v, np.flatnonzero(codes == i)) for i, v in enumerate(uniques)]
