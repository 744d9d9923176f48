"""NaN / inf in profiles: count them, report them, and apply an explicit policy."""

from __future__ import annotations

import anndata as ad
import numpy as np

from celldino.errors import DataError
from celldino.log import get_logger
from celldino.pp.steps import record

logger = get_logger(__name__)
POLICIES = ("drop_feature", "drop_row", "error")


def handle_nonfinite(
    adata: ad.AnnData, *, policy: str = "drop_feature", copy: bool = False
) -> ad.AnnData | None:
    """Count non-finite values; drop the features or rows holding them, or raise (policy).

    Drops them from `adata` itself (as scanpy's filters) and returns None; copy=True returns
    the filtered copy instead and leaves `adata` untouched.
    """
    if policy not in POLICIES:
        raise DataError(f"nonfinite policy must be one of {POLICIES}, got {policy!r}")
    X = np.asarray(adata.X, dtype=np.float64)  # (n_obs, n_vars)
    bad = ~np.isfinite(X)
    n_bad = int(bad.sum())
    bad_vars = np.flatnonzero(bad.any(axis=0))
    bad_rows = np.flatnonzero(bad.any(axis=1))
    params = {
        "policy": policy,
        "n_nonfinite": n_bad,
        "n_nan": int(np.isnan(X).sum()),
        "n_inf": int(np.isinf(X).sum()),
        "features": [str(adata.var_names[j]) for j in bad_vars[:50]],
        "n_features_affected": int(len(bad_vars)),
        "n_rows_affected": int(len(bad_rows)),
    }
    if n_bad == 0:
        adata = adata.copy() if copy else adata
        record(adata, "nonfinite", params)
        return adata if copy else None
    where = ", ".join(f"{adata.var_names[j]} ({int(bad[:, j].sum())})" for j in bad_vars[:5]) + (
        " ..." if len(bad_vars) > 5 else ""
    )
    msg = (
        f"{n_bad} non-finite values (NaN {params['n_nan']}, inf {params['n_inf']}) in "
        f"{len(bad_vars)} feature(s) and {len(bad_rows)} row(s): {where}"
    )
    if policy == "error":
        first = bad_rows[0]
        raise DataError(
            f"{msg}; first bad row {first} ({adata.obs.iloc[first].to_dict()}). "
            "Set the policy to drop_feature or drop_row to continue."
        )
    if policy == "drop_feature" and len(bad_vars) == adata.n_vars:
        raise DataError(
            f"{msg}: every feature holds NaN/inf, so dropping them (profile.nonfinite="
            f"drop_feature) would leave {adata.n_obs} profiles × 0 features. The input "
            "features are NaN: check the extraction (NaN embeddings) or the feature columns"
        )
    if policy == "drop_row" and len(bad_rows) == adata.n_obs:
        raise DataError(
            f"{msg}: every profile holds NaN/inf, so dropping them (profile.nonfinite=drop_row) "
            "would leave 0 profiles; use profile.nonfinite=drop_feature or fix the input"
        )
    adata = adata.copy() if copy else adata
    if policy == "drop_feature":
        adata._inplace_subset_var(np.setdiff1d(np.arange(adata.n_vars), bad_vars))
        logger.warning("%s; dropped those features", msg)
    else:
        adata._inplace_subset_obs(np.setdiff1d(np.arange(adata.n_obs), bad_rows))
        logger.warning("%s; dropped those rows", msg)
    record(adata, "nonfinite", params)
    return adata if copy else None
