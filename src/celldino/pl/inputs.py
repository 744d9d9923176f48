"""What the plots take: a feature matrix with its metadata `(X, obs)`, or an AnnData."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd


def matrix_and_obs(data: Any, obs: pd.DataFrame | None = None) -> tuple[np.ndarray, pd.DataFrame]:
    """`(X, obs)` from an AnnData (`adata.X`, `adata.obs`) or from a matrix and its metadata."""
    import anndata as ad

    if isinstance(data, ad.AnnData):
        if obs is not None:
            raise TypeError("pass an AnnData alone (its metadata is adata.obs), or X with obs")
        X = data.X.toarray() if hasattr(data.X, "toarray") else data.X  # sparse → dense
        return np.asarray(X), data.obs
    if obs is None:
        raise TypeError("pass an AnnData, or a feature matrix X with its metadata obs")
    return data, obs
