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
    use_rep: str | None = None,
    copy: bool = False,
) -> ad.AnnData | None:
    """Correct obs[`key`] batch effects in X. Run on PCA or sphered profiles.

    use_rep='X_pca' corrects obsm['X_pca'] (written by pp.pca) into obsm['X_pca_harmony'] and
    leaves X as it is (scanpy.external's harmony_integrate). Modifies `adata` and returns None;
    copy=True returns a corrected copy instead.

    harmonypy >= 2 returns `Z_corr` as (cells, features); older versions as (features, cells):
    both are handled.
    """
    import harmonypy

    if key not in adata.obs.columns:
        raise DataError(f"harmony batch key {key!r} not in the metadata {list(adata.obs.columns)}")
    n_batches = adata.obs[key].nunique()
    if n_batches < 2:
        raise DataError(f"harmony needs at least 2 values of {key!r}, found {n_batches}")
    if use_rep is not None and use_rep not in adata.obsm:
        raise DataError(
            f"harmony use_rep={use_rep!r} not in obsm {list(adata.obsm.keys())}: "
            "run pp.pca first (it writes obsm['X_pca']) or leave use_rep unset to correct X"
        )
    X = np.asarray(adata.X if use_rep is None else adata.obsm[use_rep], dtype=np.float64)
    meta = adata.obs[[key]].astype(str)
    ho = harmonypy.run_harmony(
        X,
        meta,
        key,
        theta=theta,
        sigma=sigma,
        nclust=nclust,
        max_iter_harmony=max_iter,
        random_state=random_state,
        verbose=False,
        ncores=ncores,
    )
    Z = np.asarray(ho.Z_corr, dtype=np.float64)
    if Z.shape != X.shape:
        Z = Z.T  # harmonypy < 2: (features, cells)
    adata = adata.copy() if copy else adata
    if use_rep is None:
        adata.X = Z  # (n_obs, d)
    else:
        adata.obsm[f"{use_rep}_harmony"] = Z
    record(
        adata,
        "harmony",
        {
            "key": key,
            "theta": theta,
            "sigma": sigma,
            "nclust": nclust,
            "max_iter": max_iter,
            "random_state": random_state,
            "n_batches": int(n_batches),
            "use_rep": use_rep or "X",
        },
    )
    return adata if copy else None
