"""Consensus profiles: one profile per treatment from its replicate wells (mean or median)."""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd

from celldino.errors import DataError
from celldino.io.profiles import obs_names
from celldino.io.tables import one_spelling_per_number
from celldino.log import get_logger
from celldino.pp.steps import record

logger = get_logger(__name__)


COUNT = "Metadata_Count_Replicates"


def consensus(
    adata: ad.AnnData,
    *,
    by: Sequence[str] = ("Metadata_Compound",),
    method: str = "median",
    numeric: Sequence[str] = ("Metadata_Dose",),
) -> ad.AnnData:
    """Group profiles by obs[`by`] and take the mean or median of each feature.

    Metadata constant within every group is kept; `Metadata_Count_Replicates` counts profiles
    (a column of that name in the input, e.g. profiles that are consensus profiles already, is
    kept as `Metadata_Count_Replicates_input`, with a warning, not overwritten). Keys in
    `numeric` (doses) are read as text as written: the spellings of one number (`1`, `1.0`)
    are one group (`io.tables.one_spelling_per_number`), named by the first.
    """
    if method not in ("mean", "median"):
        raise DataError(f"consensus method must be 'mean' or 'median', got {method!r}")
    by = list(by)
    missing = [k for k in by if k not in adata.obs.columns]
    if missing:
        raise DataError(f"consensus keys {missing} not in the metadata {list(adata.obs.columns)}")
    feats = list(map(str, adata.var_names))
    df = pd.DataFrame(np.asarray(adata.X, dtype=np.float64), columns=feats)
    obs = adata.obs.reset_index(drop=True)
    if COUNT in obs.columns:
        kept = f"{COUNT}_input"
        if kept in obs.columns or COUNT in by:
            raise DataError(
                f"the profiles hold a {COUNT} column, which consensus writes, and it is "
                f"{'a consensus key' if COUNT in by else f'also held as {kept}'}; rename it"
            )
        logger.warning(
            "the profiles hold a %s column, which consensus writes (the number of profiles per "
            "group): the input's is kept as %s",
            COUNT,
            kept,
        )
        obs = obs.rename(columns={COUNT: kept})
    for k in by:
        if k in numeric:
            obs[k], merged = one_spelling_per_number(obs[k])
            if merged:
                logger.warning(
                    "consensus key %s spells one number several ways (%s): one group each",
                    k,
                    "; ".join(" = ".join(sp) for sp in merged[:5]),
                )
    for k in by:
        df[k] = obs[k].to_numpy()
    grouped = df.groupby(by, sort=True, dropna=False, observed=True)
    prof = grouped[feats].median() if method == "median" else grouped[feats].mean()
    prof = prof.reset_index()
    other = [c for c in obs.columns if c not in by]
    if other:
        meta = obs[other].copy()
        for k in by:
            meta[k] = obs[k].to_numpy()
        g = meta.groupby(by, sort=True, dropna=False, observed=True)
        constant = [c for c in other if bool((g[c].nunique(dropna=False) <= 1).all())]
        first = g[constant].first().reset_index() if constant else None
        if first is not None:
            prof = prof.merge(first, on=by, how="left")
    prof[COUNT] = grouped.size().to_numpy()
    meta_cols = [c for c in prof.columns if c not in feats]
    out = ad.AnnData(
        X=prof[feats].to_numpy(dtype=np.float64),
        obs=prof[meta_cols].set_axis(obs_names(prof, by)),
        var=pd.DataFrame(index=pd.Index(feats, dtype=str)),
        uns=dict(adata.uns),
    )
    out.uns["celldino"] = dict(adata.uns.get("celldino", {}))
    record(out, "consensus", {"by": by, "method": method, "n_profiles": int(out.n_obs)})
    return out
