"""Normalisation within each plate (or globally), fitted on negative controls or all profiles.

- standardize: (x - mean) / std of the reference profiles (population std).
- mad_robustize: (x - median) / (1.4826 * MAD + epsilon) of the reference profiles,
  pycytominer's `mad_robustize` (its default epsilon 1e-18).

**The scale floor** (`scale_floor`, default 1). Negative controls are few (16 to 32 wells per
plate) and some features are nearly constant in them (counts, thresholded areas, saturated
intensities) while varying across the treated wells. Their control MAD is then ~0, and dividing
by it (pycytominer's epsilon is 1e-18) makes values of 1e16 that decide every cosine similarity
(seen on BBBC021's CellProfiler profiles). With a floor, each feature's scale is at least
`scale_floor` times its spread over *all* profiles of the group (1.4826 × MAD of every profile,
or their std where that MAD is 0). With the default 1 the scale is the larger of the controls'
spread and the plate's: the controls may show that a feature is noisier than the plate suggests,
but they cannot make it look more precise than the plate's wells as a whole, so no feature is
magnified beyond its own plate-wide spread however tight its controls happen to be. The plate's
MAD is a median over wells, so a minority of strongly active wells does not move it. The floor
is relative to each feature's own scale, so it means the same for pixels, intensities or
embedding units (an absolute epsilon cannot). A control MAD of 0 falls back to the control std
first. `scale_floor=0` is pycytominer's arithmetic exactly (kept for parity; `epsilon` is used
only then). Measured (docs/validation.md, "Profile recipe"): floors 0.1 / 0.5 / 1 give the same
LINCS retrieval; on the synthetic screen 1 gave the best NSCB and the only one not moved by
five planted near-constant-in-controls features.

Features with zero spread in every profile of the input carry nothing and are dropped (logged
with their count) instead of being divided by epsilon.
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
SCALE_FLOOR = 1.0  # default floor: a fraction of each feature's spread over all profiles


def _mad(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    center = np.median(X, axis=0)
    return center, np.median(np.abs(X - center), axis=0) * MAD_SCALE


def _fit(ref: np.ndarray, method: str, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """(center, scale) per feature from the reference rows (n_ref, n_features)."""
    if method == "standardize":
        center = ref.mean(axis=0)
        scale = ref.std(axis=0)
        scale[scale == 0] = 1.0
        return center, scale
    center, mad = _mad(ref)
    return center, mad + epsilon


def _control_fit(ref: np.ndarray, method: str) -> tuple[np.ndarray, np.ndarray]:
    """(center, scale) of the reference rows; a MAD of 0 (more than half the controls tie)
    falls back to their std."""
    if method == "standardize":
        return ref.mean(axis=0), ref.std(axis=0)
    center, scale = _mad(ref)
    zero = scale == 0
    scale[zero] = ref[:, zero].std(axis=0)
    return center, scale


def _fit_floored(
    ref: np.ndarray,
    group: np.ndarray,
    method: str,
    scale_floor: float,
    pooled: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """(center, scale, number of features floored): the control scale floored at `scale_floor`
    × the group's spread, or × `pooled` (the median control scale over all groups) when given."""
    center, scale = _control_fit(ref, method)
    if pooled is None:
        spread = _control_fit(group, "mad_robustize")[1]  # MAD, std where it is 0
    else:
        spread = pooled.copy()
        zero = spread == 0  # the controls vary in it on no plate: the group's spread instead
        if zero.any():
            spread[zero] = _control_fit(group[:, zero], "mad_robustize")[1]
    floor = scale_floor * spread
    n_floored = int((floor > scale).sum())
    scale = np.maximum(scale, floor)
    scale[scale == 0] = 1.0  # constant in this whole group: every value is the center → 0
    return center, scale, n_floored


def normalize(
    adata: ad.AnnData,
    *,
    method: str = "mad_robustize",
    by: str | None = "Metadata_Plate",
    reference: str = "controls",
    controls: Controls = None,
    epsilon: float = 1e-18,
    scale_floor: float = SCALE_FLOOR,
    floor_reference: str = "all",
    copy: bool = False,
) -> ad.AnnData | None:
    """Normalise features, one fit per value of obs[`by`] ('' or None: one global fit).

    reference='controls' fits on negative controls (given here or marked by pp.annotate);
    a group without controls is an error naming it. reference='all' fits on every profile.
    scale_floor: each feature's scale is at least this fraction of its spread over all profiles
    of the group (see the module docstring); 0 gives pycytominer's arithmetic (MAD + epsilon).
    floor_reference='controls': the floor is `scale_floor` × the median over groups of the
    controls' scale instead (a plate's controls cannot look more precise than the typical
    plate's controls), or, for a feature the controls vary in on no plate (one control well per
    plate), the group's spread as with 'all'.
    Features constant over every profile are dropped. Modifies `adata` and returns None;
    copy=True returns a normalised copy instead.
    """
    if method not in METHODS:
        raise DataError(f"normalisation method must be one of {METHODS}, got {method!r}")
    if reference not in ("controls", "all"):
        raise DataError(f"reference must be 'controls' or 'all', got {reference!r}")
    if not 0 <= scale_floor <= 1:
        raise DataError(f"scale_floor must be in [0, 1], got {scale_floor}")
    if floor_reference not in ("all", "controls"):
        raise DataError(f"floor_reference must be 'all' or 'controls', got {floor_reference!r}")
    mask = control_mask(adata, controls) if reference == "controls" else np.ones(adata.n_obs, bool)
    adata = adata.copy() if copy else adata
    X = np.asarray(adata.X, dtype=np.float64)
    constant = np.all(X == X[:1], axis=0) if len(X) else np.zeros(X.shape[1], bool)
    if constant.all():
        raise DataError(
            f"all {adata.n_vars} features are constant over the {adata.n_obs} profiles: "
            "nothing to normalise"
        )
    if constant.any():
        logger.warning(
            "normalize: dropped %d of %d features that are constant over all %d profiles "
            "(first: %s)",
            int(constant.sum()),
            len(constant),
            adata.n_obs,
            adata.var_names[np.flatnonzero(constant)[0]],
        )
        adata._inplace_subset_var(~constant)
        X = X[:, ~constant]
    X = X.copy()  # (n_obs, n_vars)
    out = np.empty_like(X)
    n_floored = 0
    pooled = None
    if scale_floor > 0 and floor_reference == "controls":
        scales = [
            _control_fit(X[rows[mask[rows]]], method)[1]
            for _, rows in groups(adata, by)
            if mask[rows].any()
        ]
        pooled = np.median(np.vstack(scales), axis=0) if scales else None
    for value, rows in groups(adata, by):
        ref_rows = rows[mask[rows]]
        if len(ref_rows) == 0:
            raise DataError(
                f"{by} {value!r} has no control profiles to normalise against "
                f"({len(rows)} profiles, none selected as controls); add control wells, "
                "fix the controls selection, or use reference='all'"
            )
        if scale_floor > 0:
            center, scale, floored = _fit_floored(X[ref_rows], X[rows], method, scale_floor, pooled)
            n_floored += floored
            out[rows] = (X[rows] - center) / scale
            continue
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
                    "profiles; they are divided by epsilon=%g (as pycytominer with "
                    "profile.normalize_floor=0)",
                    where,
                    int(flat.sum()),
                    len(flat),
                    len(ref_rows),
                    epsilon,
                )
        out[rows] = (X[rows] - center) / scale
    if n_floored:
        logger.info(
            "normalize: %d (feature, %s) scales raised to the floor (%g × the spread of all "
            "profiles)",
            n_floored,
            by or "group",
            scale_floor,
        )
    adata.X = out
    record(
        adata,
        "normalize",
        {
            "method": method,
            "by": by or "",
            "reference": reference,
            "epsilon": epsilon,
            "scale_floor": scale_floor,
            "floor_reference": floor_reference,
            "n_floored": n_floored,
            "n_constant_dropped": int(constant.sum()),
            "n_reference": int(mask.sum()),
        },
    )
    return adata if copy else None
