"""Normalisation within each plate (or globally), fitted on negative controls or all profiles.

- standardize: (x - mean) / std (population std; a zero std leaves the feature unscaled, as
  sklearn's StandardScaler).
- mad_robustize: (x - median) / (1.4826 * MAD + epsilon), pycytominer's `mad_robustize` with
  its default epsilon 1e-18.
"""

from __future__ import annotations

import anndata as ad
import numpy as np

from celldino.errors import DataError
from celldino.log import get_logger
from celldino.pp.controls import Controls, control_mask, groups
from celldino.pp.steps import record

logger = get_logger(__name__)

METHODS = ("standardize", "mad_robustize")
MAD_SCALE = 1.4826  # scipy's median_abs_deviation(scale=1/1.4826), as pycytominer


def _fit(ref: np.ndarray, method: str, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """(center, scale) per feature from the reference rows (n_ref, n_features)."""
    if method == "standardize":
        center = ref.mean(axis=0)
        scale = ref.std(axis=0)
        scale[scale == 0] = 1.0
        return center, scale
    center = np.median(ref, axis=0)
    mad = np.median(np.abs(ref - center), axis=0) * MAD_SCALE
    return center, mad + epsilon


def normalize(
    adata: ad.AnnData,
    *,
    method: str = "mad_robustize",
    by: str | None = "Metadata_Plate",
    reference: str = "controls",
    controls: Controls = None,
    epsilon: float = 1e-18,
    copy: bool = False,
) -> ad.AnnData | None:
    """Normalise features, one fit per value of obs[`by`] ('' or None: one global fit).

    reference='controls' fits on negative controls (given here or marked by pp.annotate);
    a group without controls is an error naming it. reference='all' fits on every profile.
    Modifies `adata` and returns None; copy=True returns a normalised copy instead.
    """
    if method not in METHODS:
        raise DataError(f"normalisation method must be one of {METHODS}, got {method!r}")
    if reference not in ("controls", "all"):
        raise DataError(f"reference must be 'controls' or 'all', got {reference!r}")
    mask = control_mask(adata, controls) if reference == "controls" else np.ones(adata.n_obs, bool)
    adata = adata.copy() if copy else adata
    X = np.asarray(adata.X, dtype=np.float64).copy()  # (n_obs, n_vars)
    out = np.empty_like(X)
    for value, rows in groups(adata, by):
        ref_rows = rows[mask[rows]]
        if len(ref_rows) == 0:
            raise DataError(
                f"{by} {value!r} has no control profiles to normalise against "
                f"({len(rows)} profiles, none selected as controls); add control wells, "
                "fix the controls selection, or use reference='all'"
            )
        center, scale = _fit(X[ref_rows], method, epsilon)
        if method == "mad_robustize":
            flat = scale <= epsilon  # MAD 0: the profiles would be multiplied by 1/epsilon
            where = f"{by} {value!r}" if by else "all profiles"
            if flat.all():
                raise DataError(
                    f"{where}: the {len(ref_rows)} reference profile(s) have zero spread (MAD 0) "
                    f"in every feature, so mad_robustize would divide by epsilon={epsilon:g}; "
                    "give more control wells, normalise globally (profile.normalize_by=''), "
                    "use profile.normalize_reference=all or profile.normalize=standardize"
                )
            if flat.any():
                logger.warning(
                    "%s: %d of %d features have zero spread (MAD 0) in the %d reference "
                    "profiles; they are divided by epsilon=%g (as pycytominer)",
                    where,
                    int(flat.sum()),
                    len(flat),
                    len(ref_rows),
                    epsilon,
                )
        out[rows] = (X[rows] - center) / scale
    adata.X = out
    record(
        adata,
        "normalize",
        {
            "method": method,
            "by": by or "",
            "reference": reference,
            "epsilon": epsilon,
            "n_reference": int(mask.sum()),
        },
    )
    return adata if copy else None
