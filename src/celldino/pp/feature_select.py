"""Feature selection with pycytominer's rules (same thresholds give the same features).

- variance: drop features whose population variance is <= min_variance (sklearn
  VarianceThreshold keeps variance > threshold).
- frequency: drop features whose 2nd-most-common / most-common value count < freq_cut, or
  whose unique-value ratio < unique_cut.
- correlation: for every pair (a, b) with correlation > threshold, drop the member with the
  larger total absolute correlation to all features (all pairs decided at once, as pycytominer).
- drop_na: drop features with more than na_cutoff missing values.
- drop_outliers: drop features with any absolute value > outlier_cutoff (pycytominer's
  `drop_outliers`, meant for normalised profiles: a feature that reaches 500 spreads from the
  controls is an artefact of a tiny control spread, not biology).
- blocklist: drop the named features; blocklist=None drops pycytominer's packaged CellProfiler
  blocklist (Way 2019: Manders/RWC correlations, granularity 14-16, ... ; read through
  pycytominer's `Blocklist('default')`).
- replicate: keep features whose replicate wells agree (cytominer's variable importance by
  replicate correlation): for each feature, the Pearson correlation over the profiles between a
  profile's value and the mean of its replicates (the other profiles with the same
  `replicate_key` values, groups of two or more); features at or below `replicate_threshold`
  are dropped. Needs a replicate key (e.g. compound and dose).
"""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd

from celldino.errors import DataError
from celldino.log import get_logger
from celldino.pp.controls import Controls, select
from celldino.pp.steps import record

logger = get_logger(__name__)

OPERATIONS = (
    "variance",
    "frequency",
    "correlation",
    "drop_na",
    "drop_outliers",
    "blocklist",
    "replicate",
)


def default_blocklist() -> list[str]:
    """pycytominer's packaged CellProfiler blocklist (its `default` list)."""
    from pycytominer.cyto_utils.blocklist import Blocklist

    return Blocklist("default").to_list()


def replicate_correlation(X: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per feature: Pearson correlation between each profile and the mean of its replicates.

    X (n, d); labels (n,) group codes. Profiles whose group has one member are left out.
    A feature with no variance among the used profiles gets correlation 0.
    """
    codes, counts = np.unique(labels, return_inverse=True, return_counts=True)[1:]
    size = counts[codes]
    use = size >= 2
    X, codes, size = X[use], codes[use], size[use]
    if len(X) < 3:
        raise DataError(
            "replicate feature selection needs replicate groups (two or more profiles with the "
            f"same replicate key), found {int(use.sum())} profiles in such groups"
        )
    sums = np.zeros((codes.max() + 1, X.shape[1]))
    np.add.at(sums, codes, X)
    others = (sums[codes] - X) / (size - 1)[:, None]  # mean of the other replicates (n, d)
    a, b = X - X.mean(axis=0), others - others.mean(axis=0)
    den = np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))
    return np.divide((a * b).sum(axis=0), den, out=np.zeros(X.shape[1]), where=den > 0)


def _variance(X: np.ndarray, min_variance: float) -> np.ndarray:
    return ~(np.nanvar(X, axis=0) > min_variance)


def _frequency(X: np.ndarray, freq_cut: float, unique_cut: float) -> np.ndarray:
    drop = np.zeros(X.shape[1], bool)
    for j in range(X.shape[1]):
        counts = pd.Series(X[:, j]).value_counts()  # NaN not counted, as pandas value_counts
        ratio = counts.iloc[1] / counts.iloc[0] if len(counts) >= 2 else 0.0
        drop[j] = ratio < freq_cut or (pd.Series(X[:, j]).nunique() / X.shape[0]) < unique_cut
    return drop


def _correlation(X: np.ndarray, names: list[str], threshold: float, method: str) -> np.ndarray:
    if method == "pearson" and np.isfinite(X).all():
        corr = np.corrcoef(X.T)  # (d, d)
    else:
        corr = pd.DataFrame(X, columns=names).corr(method=method).to_numpy()
    # rank of each feature by total absolute correlation (ascending, pandas' sort order)
    order = pd.Series(np.abs(corr).sum(axis=0), index=names).sort_values().index
    rank = pd.Series(np.arange(len(order)), index=order).reindex(names).to_numpy()
    i, j = np.nonzero(np.tril(corr > threshold, k=-1))  # pairs (a=row, b=column), a > b
    drop = np.zeros(len(names), bool)
    drop[np.where(rank[i] > rank[j], i, j)] = True
    return drop


def feature_select(
    adata: ad.AnnData,
    *,
    operations: Sequence[str] = ("variance", "correlation"),
    min_variance: float = 1e-6,
    freq_cut: float = 0.05,
    unique_cut: float = 0.01,
    corr_threshold: float = 0.9,
    corr_method: str = "pearson",
    na_cutoff: float = 0.05,
    outlier_cutoff: float = 500.0,
    blocklist: Sequence[str] | None = None,
    replicate_key: Sequence[str] = (),
    replicate_threshold: float = 0.0,
    samples: Controls = None,
    copy: bool = False,
) -> ad.AnnData | None:
    """Drop features by the given operations in order.

    samples: compute the statistics on a subset (a selection, (column, value) or mask);
    None uses every profile (pycytominer's samples='all'). blocklist=None uses pycytominer's
    packaged list. replicate_key: the obs columns whose equal values make replicates. Drops the features from `adata`
    itself (as scanpy's filters) and returns None; copy=True returns the selected copy instead.
    """
    unknown = [op for op in operations if op not in OPERATIONS]
    if unknown:
        raise DataError(f"unknown feature selection operation(s) {unknown}; choose {OPERATIONS}")
    if not 0 <= corr_threshold <= 1:
        raise DataError(f"corr_threshold must be in [0, 1], got {corr_threshold}")
    if "replicate" in operations:
        missing = [k for k in replicate_key if k not in adata.obs.columns]
        if not replicate_key or missing:
            raise DataError(
                f"replicate feature selection needs replicate_key columns of the metadata "
                f"(got {list(replicate_key)}; missing {missing}; columns: "
                f"{list(adata.obs.columns)[:20]})"
            )
    if blocklist is None:
        blocklist = default_blocklist() if "blocklist" in operations else []
    rows = np.ones(adata.n_obs, bool) if samples is None else select(adata.obs, samples, "samples")
    keep = np.ones(adata.n_vars, bool)
    names = np.asarray(list(map(str, adata.var_names)))
    X_all = np.asarray(adata.X, dtype=np.float64)[rows]
    dropped: dict[str, list[str]] = {}
    for op in operations:
        idx = np.flatnonzero(keep)
        X = X_all[:, idx]
        if op == "variance":
            drop = _variance(X, min_variance)
        elif op == "frequency":
            drop = _frequency(X, freq_cut, unique_cut)
        elif op == "correlation":
            drop = _correlation(X, list(names[idx]), corr_threshold, corr_method)
        elif op == "drop_na":
            drop = np.isnan(X).mean(axis=0) > na_cutoff
        elif op == "drop_outliers":
            drop = (np.abs(np.nanmax(X, axis=0)) > outlier_cutoff) | (
                np.abs(np.nanmin(X, axis=0)) > outlier_cutoff
            )
        elif op == "replicate":
            labels = pd.factorize(
                adata.obs.loc[rows, list(replicate_key)].astype(str).agg("|".join, axis=1)
            )[0]
            drop = replicate_correlation(X, labels) <= replicate_threshold
        else:
            drop = np.isin(names[idx], list(blocklist))
        keep[idx[drop]] = False
        dropped[op] = list(names[idx[drop]])
    if not keep.any():
        counts = ", ".join(f"{op} {len(v)}" for op, v in dropped.items())
        raise DataError(
            f"feature selection {list(operations)} would drop all {adata.n_vars} features "
            f"({counts}); loosen profile.min_variance / profile.corr_threshold or select less"
        )
    logger.info(
        "feature_select: kept %d of %d features (dropped: %s)",
        int(keep.sum()),
        len(keep),
        ", ".join(f"{op} {len(v)}" for op, v in dropped.items()),
    )
    adata = adata.copy() if copy else adata
    adata._inplace_subset_var(keep)
    record(
        adata,
        "feature_select",
        {
            "operations": list(operations),
            "min_variance": min_variance,
            "freq_cut": freq_cut,
            "unique_cut": unique_cut,
            "corr_threshold": corr_threshold,
            "corr_method": corr_method,
            "na_cutoff": na_cutoff,
            "outlier_cutoff": outlier_cutoff,
            "blocklist": len(blocklist),
            "replicate_key": list(replicate_key),
            "replicate_threshold": replicate_threshold,
            "n_dropped": {k: len(v) for k, v in dropped.items()},
            "n_kept": int(keep.sum()),
        },
    )
    return adata if copy else None
