"""Principal components of the profiles, stored the way scanpy stores them.

`obsm['X_pca']` (profiles × k) holds the projection, `varm['PCs']` (features × k) the loadings,
`uns['pca']` the variance and variance ratio of each component, the reference mean and the
parameters; `X` is left as it is. Fitting on the controls (reference='controls') gives the axes
of the controls' variation, onto which every profile is projected.
"""

from __future__ import annotations

import anndata as ad
import numpy as np

from celldino.pp.controls import Controls, control_mask
from celldino.pp.steps import record


def pca(
    adata: ad.AnnData,
    *,
    n_components: int | float | None = None,
    reference: str = "all",
    controls: Controls = None,
    copy: bool = False,
) -> ad.AnnData | None:
    """Principal components fitted on the controls or on all profiles (sklearn PCA).

    n_components: an int, a fraction of variance to keep, or None for all of them. Writes
    obsm['X_pca'], varm['PCs'] and uns['pca'] (scanpy's keys); X is unchanged. Modifies
    `adata` and returns None; copy=True returns a copy holding them instead.
    """
    from sklearn.decomposition import PCA

    mask = control_mask(adata, controls) if reference == "controls" else np.ones(adata.n_obs, bool)
    X = np.asarray(adata.X, dtype=np.float64)  # (n_obs, n_vars)
    model = PCA(n_components=n_components, svd_solver="full").fit(X[mask])
    adata = adata.copy() if copy else adata
    adata.obsm["X_pca"] = model.transform(X)  # (n_obs, k)
    adata.varm["PCs"] = model.components_.T  # (n_vars, k)
    k = model.n_components_
    params = {"n_components": int(k), "reference": reference, "n_reference": int(mask.sum())}
    adata.uns["pca"] = {
        "params": params,
        "variance": model.explained_variance_,
        "variance_ratio": model.explained_variance_ratio_,
        "mean": model.mean_,  # of the reference profiles: X_pca = (X - mean) @ PCs
    }
    record(
        adata, "pca", {**params, "explained_variance": float(model.explained_variance_ratio_.sum())}
    )
    return adata if copy else None
