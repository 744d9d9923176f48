"""Sphering (whitening, typical variation normalisation) fitted on negative controls.

Same estimator as `pycytominer.operations.Spherize`: centre (and for the -cor variants scale)
the reference, SVD X = U S V^T, W = V diag(1 / (S + epsilon)) sqrt(n - 1) (PCA whitening),
and W V^T for ZCA. Fitting on controls makes their covariance the identity (up to epsilon);
every profile is then mapped with the same W. Unlike pycytominer, a rank-deficient reference
(fewer controls than features, or linearly dependent features) is not an error: the singular
values are regularised (zeros replaced by the smallest kept one, then + epsilon) with a warning.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd

from celldino.errors import DataError
from celldino.log import get_logger
from celldino.pp.controls import Controls, control_mask, groups
from celldino.pp.steps import record

logger = get_logger(__name__)
METHODS = ("ZCA", "PCA", "ZCA-cor", "PCA-cor")


def fit_whitening(
    ref: np.ndarray,
    *,
    method: str = "ZCA",
    epsilon: float = 1e-6,
    center: bool = True,
    where: str = "",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, scale, W) such that ((x - mean) / scale) @ W is white on `ref` (n, d)."""
    if method not in METHODS:
        raise DataError(f"sphering method must be one of {METHODS}, got {method!r}")
    if method.endswith("-cor") and not center:
        raise DataError("PCA-cor and ZCA-cor need center=True")
    n, d = ref.shape
    if n < 2:
        raise DataError(f"sphering{where} needs at least 2 reference profiles, got {n}")
    mean = ref.mean(axis=0) if center else np.zeros(d)
    scale = np.ones(d)
    if method.endswith("-cor"):
        scale = ref.std(axis=0)
        zero = np.flatnonzero(scale == 0)
        if len(zero):
            raise DataError(
                f"sphering{where}: {len(zero)} feature(s) have zero variance in the reference "
                f"(first: column {zero[0]}); remove them first (pp.feature_select variance)"
            )
    Xc = (ref - mean) / scale  # (n, d)
    _, S, Vt = np.linalg.svd(Xc, full_matrices=True)  # S (min(n, d),), Vt (d, d)
    tol = S.max(initial=0.0) * max(n, d) * np.finfo(np.float64).eps
    r = int((S > tol).sum())  # rank, as np.linalg.matrix_rank
    full = r == d or (center and r == n - 1 and n <= d) or (not center and r == n and n <= d)
    if r == 0:
        raise DataError(f"sphering{where}: the reference profiles are all identical")
    if len(S) < d or r < len(S):
        S = np.concatenate([S[:r], np.repeat(S[r - 1], d - r)])
    if not full or n <= d:
        logger.warning(
            "sphering%s: the reference covariance is singular (rank %d of %d features, %d "
            "profiles); regularised: missing singular values set to the smallest kept one, "
            "plus epsilon=%g",
            where,
            r,
            d,
            n,
            epsilon,
        )
    S = S + epsilon
    W = (Vt / S[:, None]).T * np.sqrt(n - 1)  # (d, d): PCA whitening
    if method.startswith("ZCA"):
        W = W @ Vt  # rotate back: ZCA whitening
    return mean, scale, W


def sphere(
    adata: ad.AnnData,
    *,
    method: str = "ZCA",
    epsilon: float = 1e-6,
    center: bool = True,
    by: str | None = None,
    reference: str = "controls",
    controls: Controls = None,
    copy: bool = False,
) -> ad.AnnData | None:
    """Whiten profiles with a transform fitted on the controls, per value of obs[`by`] or global.

    For PCA/PCA-cor the features become PC1..PCd (as pycytominer): `var` is replaced and
    `varm` (keyed by the old features) emptied. Modifies `adata` and returns None; copy=True
    returns a sphered copy instead.
    """
    mask = control_mask(adata, controls) if reference == "controls" else np.ones(adata.n_obs, bool)
    X = np.asarray(adata.X, dtype=np.float64)  # (n_obs, d)
    out = np.empty_like(X)
    for value, rows in groups(adata, by):
        ref_rows = rows[mask[rows]]
        where = f" ({by} {value!r})" if by else ""
        if len(ref_rows) == 0:
            raise DataError(f"{by} {value!r} has no control profiles to fit the sphering on")
        mean, scale, W = fit_whitening(
            X[ref_rows], method=method, epsilon=epsilon, center=center, where=where
        )
        out[rows] = ((X[rows] - mean) / scale) @ W
    adata = adata.copy() if copy else adata
    adata.X = out
    if method.startswith("PCA"):
        names = [f"PC{i + 1}" for i in range(X.shape[1])]
        adata.var = pd.DataFrame(index=pd.Index(names, dtype=str))
        for k in list(adata.varm.keys()):
            del adata.varm[k]
    params = {"method": method, "epsilon": epsilon, "center": center, "by": by or ""}
    record(adata, "sphere", {**params, "reference": reference, "n_reference": int(mask.sum())})
    return adata if copy else None
