"""Harmony batch correction (Korsunsky et al. 2019) through harmonypy, called directly."""

from __future__ import annotations

import anndata as ad
import numpy as np

from celldino.errors import DataError
from celldino.log import get_logger
from celldino.pp.steps import record

logger = get_logger(__name__)


def harmony(
    adata: ad.AnnData,
    *,
    key: str,
    theta: float = 2.0,
    sigma: float = 0.1,
    nclust: int | None = None,
    max_iter: int = 10,
    random_state: int = 0,
    ncores: int = 1,
    copy: bool = False,
) -> ad.AnnData | None:
    """Correct obs[`key`] batch effects in X. Run on PCA or sphered profiles.

    Modifies `adata` and returns None; copy=True returns a corrected copy instead.

    harmonypy >= 2 returns `Z_corr` as (cells, features); older versions as (features, cells):
    both are handled.
    """
    import harmonypy

    if key not in adata.obs.columns:
        raise DataError(f"harmony batch key {key!r} not in the metadata {list(adata.obs.columns)}")
    n_batches = adata.obs[key].nunique()
    if n_batches < 2:
        raise DataError(f"harmony needs at least 2 values of {key!r}, found {n_batches}")
    X = np.asarray(adata.X, dtype=np.float64)  # (n_obs, d)
    meta = adata.obs[[key]].astype(str)
    ho = harmonypy.run_harmony(
        X, meta, key, theta=theta, sigma=sigma, nclust=nclust, max_iter_harmony=max_iter,
        random_state=random_state, verbose=False, ncores=ncores,
    )  # fmt: skip
    Z = np.asarray(ho.Z_corr, dtype=np.float64)
    if Z.shape != X.shape:
        Z = Z.T  # harmonypy < 2: (features, cells)
    adata = adata.copy() if copy else adata
    adata.X = Z
    record(adata, "harmony", {"key": key, "theta": theta, "sigma": sigma, "nclust": nclust,
                              "max_iter": max_iter, "random_state": random_state,
                              "n_batches": int(n_batches)})  # fmt: skip
    return adata if copy else None
