"""Rank-based inverse-normal transform of each feature (pycytominer's `inverse_normal`)."""

from __future__ import annotations

import anndata as ad
import numpy as np

from celldino.pp.steps import record


def inverse_normal(
    adata: ad.AnnData, *, n_quantiles: int = 1000, copy: bool = False
) -> ad.AnnData | None:
    """Map each feature through its empirical CDF onto a standard normal.

    sklearn's QuantileTransformer(output_distribution='normal'), the estimator pycytominer
    wraps; n_quantiles is capped at the number of profiles. Modifies `adata` and returns None;
    copy=True returns a transformed copy instead.
    """
    from sklearn.preprocessing import QuantileTransformer

    X = np.asarray(adata.X, dtype=np.float64)
    qt = QuantileTransformer(
        n_quantiles=min(n_quantiles, X.shape[0]), output_distribution="normal", random_state=0
    )
    adata = adata.copy() if copy else adata
    adata.X = qt.fit_transform(X)
    record(adata, "inverse_normal", {"n_quantiles": int(qt.n_quantiles_)})
    return adata if copy else None
