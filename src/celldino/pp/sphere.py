"""Sphering (whitening, typical variation normalisation) fitted on negative controls.

**Shrinkage (the default, `shrinkage='oas'`)**: typical variation normalisation (Ando et al.
2017) whitens with the controls' covariance; with fewer controls than features (or near
it) that covariance is singular or its smallest eigenvalues are noise, and whitening with it
multiplies the directions the controls never varied in by ~1/0. Here the covariance is shrunk
toward (trace/d)·I, the mean eigenvalue: Σ = (1 - a)·C + a·(trace(C)/d)·I, with the intensity
`a` estimated from the data by the Oracle Approximating Shrinkage (Chen et al. 2010) or
Ledoit–Wolf estimator of sklearn, or given as a number in [0, 1]. Every eigenvalue is then at
least a·mean eigenvalue, so no direction is amplified by more than 1/sqrt(a) relative to the
typical one, and the regularisation means the same at any feature scale. Σ^(-1/2) (ZCA) or
diag(λ^(-1/2)) Vᵀ (PCA) is the transform. The -cor variants scale each feature to unit
control std first.

**shrinkage=None** is pycytominer's estimator (kept for parity). Same estimator as `pycytominer.operations.Spherize`: centre (and for the -cor variants scale)
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


SHRINKAGE_GRID = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)  # shrinkage='cv' chooses from


def _shrunk_covariance(Xc: np.ndarray, shrinkage: str | float) -> tuple[np.ndarray, float]:
    """(Σ, a): covariance of the centred rows Xc shrunk toward (trace/d)·I by sklearn.

    'ratio': a = d / (n + d) for n reference rows and d features: no shrinkage with many more
    controls than features, a = 1/2 with as many, toward 1 (a diagonal scaling) with few.
    'cv': the a of SHRINKAGE_GRID with the best held-out Gaussian likelihood of the reference
    rows (5-fold, sklearn's ShrunkCovariance score)."""
    from sklearn.covariance import (
        OAS,
        LedoitWolf,
        ShrunkCovariance,
        empirical_covariance,
        shrunk_covariance,
    )

    if shrinkage == "ratio":
        n, d = Xc.shape
        shrinkage = d / (n + d)
    elif shrinkage == "cv":
        from sklearn.model_selection import GridSearchCV, KFold

        folds = KFold(min(5, len(Xc)), shuffle=True, random_state=0)
        search = GridSearchCV(
            ShrunkCovariance(assume_centered=True), {"shrinkage": SHRINKAGE_GRID}, cv=folds
        ).fit(Xc)
        shrinkage = float(search.best_params_["shrinkage"])
    if shrinkage == "oas":
        est = OAS(assume_centered=True).fit(Xc)
        return est.covariance_, float(est.shrinkage_)
    if shrinkage == "ledoit_wolf":
        est = LedoitWolf(assume_centered=True).fit(Xc)
        return est.covariance_, float(est.shrinkage_)
    a = float(shrinkage)
    if not 0 <= a <= 1:
        raise DataError(f"sphering shrinkage must be oas, ledoit_wolf or in [0, 1], got {a}")
    return shrunk_covariance(empirical_covariance(Xc, assume_centered=True), a), a


def fit_whitening(
    ref: np.ndarray,
    *,
    method: str = "ZCA",
    epsilon: float = 1e-6,
    center: bool = True,
    shrinkage: str | float | None = "oas",
    components: int = 0,
    where: str = "",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, scale, W) such that ((x - mean) / scale) @ W is white on `ref` (n, d).

    shrinkage: 'oas', 'ledoit_wolf', 'ratio', 'cv' or a number in [0, 1] (see the module
    docstring); None: pycytominer's SVD estimator with `epsilon` added to the singular values.
    components k > 0: whiten only the k leading directions of the reference and drop the rest
    (PCA: W is (d, k); ZCA: W = V_k Λ_k^-1/2 V_kᵀ, rank k), so directions the controls barely
    sample are not magnified; 0 keeps all d."""
    if method not in METHODS:
        raise DataError(f"sphering method must be one of {METHODS}, got {method!r}")
    if method.endswith("-cor") and not center:
        raise DataError("PCA-cor and ZCA-cor need center=True")
    n, d = ref.shape
    if n < 2:
        raise DataError(f"sphering{where} needs at least 2 reference profiles, got {n}")
    if not 0 <= components <= d:
        raise DataError(
            f"sphering{where}: components={components} must be in [0, {d}] (0 = all features)"
        )
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
    if shrinkage is not None:
        if not np.any(Xc):
            raise DataError(f"sphering{where}: the reference profiles are all identical")
        cov, a = _shrunk_covariance(Xc, shrinkage)
        lam, V = np.linalg.eigh(cov)  # ascending
        lam, V = lam[::-1], V[:, ::-1]  # descending, as the SVD path (PC1 first)
        lam = np.maximum(lam, lam.max() * d * np.finfo(np.float64).eps)
        if components:
            lam, V = lam[:components], V[:, :components]
        W = V / np.sqrt(lam)[None, :]  # (d, k): PCA whitening
        if method.startswith("ZCA"):
            W = W @ V.T
        logger.info(
            "sphering%s: shrinkage %s, intensity %.3g (%d profiles, %d features%s)",
            where,
            shrinkage,
            a,
            n,
            d,
            f", {components} components" if components else "",
        )
        return mean, scale, W
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
    if components:
        S, Vt = S[:components], Vt[:components]
    W = (Vt / S[:, None]).T * np.sqrt(n - 1)  # (d, k): PCA whitening
    if method.startswith("ZCA"):
        W = W @ Vt  # rotate back: ZCA whitening
    return mean, scale, W


def sphere(
    adata: ad.AnnData,
    *,
    method: str = "ZCA",
    epsilon: float = 1e-6,
    center: bool = True,
    shrinkage: str | float | None = "oas",
    components: int = 0,
    by: str | None = None,
    reference: str = "controls",
    controls: Controls = None,
    copy: bool = False,
) -> ad.AnnData | None:
    """Whiten profiles with a transform fitted on the controls, per value of obs[`by`] or global.

    shrinkage: 'oas' (default), 'ledoit_wolf', a number in [0, 1], or None for pycytominer's
    estimator with `epsilon`. For PCA/PCA-cor the features become PC1..PCd (as pycytominer): `var` is replaced and
    `varm` (keyed by the old features) emptied. Modifies `adata` and returns None; copy=True
    returns a sphered copy instead.
    """
    mask = control_mask(adata, controls) if reference == "controls" else np.ones(adata.n_obs, bool)
    X = np.asarray(adata.X, dtype=np.float64)  # (n_obs, d)
    parts = []
    for value, rows in groups(adata, by):
        ref_rows = rows[mask[rows]]
        where = f" ({by} {value!r})" if by else ""
        if len(ref_rows) == 0:
            raise DataError(f"{by} {value!r} has no control profiles to fit the sphering on")
        mean, scale, W = fit_whitening(
            X[ref_rows],
            method=method,
            epsilon=epsilon,
            center=center,
            shrinkage=shrinkage,
            components=components,
            where=where,
        )
        parts.append((rows, ((X[rows] - mean) / scale) @ W))
    out = np.empty((X.shape[0], parts[0][1].shape[1]))
    for rows, Z in parts:
        out[rows] = Z
    if method.startswith("PCA"):
        adata = adata[:, : out.shape[1]].copy() if copy else adata
        if not copy and out.shape[1] < adata.n_vars:
            adata._inplace_subset_var(np.arange(out.shape[1]))
        names = [f"PC{i + 1}" for i in range(out.shape[1])]
        adata.var = pd.DataFrame(index=pd.Index(names, dtype=str))
        for k in list(adata.varm.keys()):
            del adata.varm[k]
    elif copy:
        adata = adata.copy()
    adata.X = out
    params = {
        "method": method,
        "shrinkage": "none" if shrinkage is None else shrinkage,
        "epsilon": epsilon,
        "center": center,
        "components": components,
        "by": by or "",
    }
    record(adata, "sphere", {**params, "reference": reference, "n_reference": int(mask.sum())})
    return adata if copy else None
