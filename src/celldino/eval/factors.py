"""Factors of variation: which annotated factor (MoA, plate, well, cell cycle…) each feature encodes.

Each feature is discretised into `n_bins` quantile bins and its mutual information (nats) with
each factor is computed from the contingency table. For every feature the factor with the
highest MI is its "most informative" factor; the summary reports the fraction of features per
factor — a model whose features mostly follow the plate learned the batch, not the biology.
`normalize="factor_entropy"` divides MI by the factor's entropy, so factors with many levels
(wells) are not favoured just for having more levels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from celldino.eval.classify import as_matrix
from celldino.eval.spec import profiles_of

if TYPE_CHECKING:
    from anndata import AnnData


def discretize(x: np.ndarray, *, n_bins: int = 10) -> np.ndarray:
    """Quantile bin codes 0..n_bins-1 of one feature (ties share a bin)."""
    edges = np.unique(np.quantile(x, np.linspace(0, 1, n_bins + 1)[1:-1]))
    return np.searchsorted(edges, x, side="right")


def mutual_information(a: np.ndarray, b: np.ndarray) -> float:
    """MI (nats) between two discrete label vectors, from their contingency table."""
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1))
    np.add.at(table, (ai, bi), 1)
    p = table / table.sum()
    pa, pb = p.sum(axis=1, keepdims=True), p.sum(axis=0, keepdims=True)
    nz = p > 0
    return float(np.sum(p[nz] * np.log(p[nz] / (pa @ pb)[nz])))


def _entropy(labels: np.ndarray) -> float:
    _, counts = np.unique(labels, return_counts=True)
    p = counts / counts.sum()
    return float(-np.sum(p * np.log(p)))


def factor_mutual_information(
    meta: pd.DataFrame | AnnData,
    X=None,
    *,
    factors: Sequence[str],
    feature_names: Sequence[str] | None = None,
    n_bins: int = 10,
    normalize: str = "none",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """MI of every feature with every factor.

    Returns the tidy table (feature, factor, mi, is_top) and the summary per factor
    (factor, n_features_top, fraction_top, mean_mi). Rows with a missing factor value are
    left out of that factor's MI.
    """
    meta, X = profiles_of(meta, X)
    if normalize not in ("none", "factor_entropy"):
        raise ValueError(f"normalize must be 'none' or 'factor_entropy', got {normalize!r}")
    if isinstance(X, pd.DataFrame) and feature_names is None:
        feature_names = list(X.columns)
    X = as_matrix(X, len(meta))
    names = (
        list(feature_names)
        if feature_names is not None
        else [f"f{j:04d}" for j in range(X.shape[1])]
    )
    if len(names) != X.shape[1]:
        raise ValueError(f"{len(names)} feature names for {X.shape[1]} features")
    missing = [c for c in factors if c not in meta.columns]
    if missing or not factors:
        raise KeyError(f"factor column(s) {missing or '[]'} not usable; give Metadata_* columns")
    binned = np.stack([discretize(X[:, j], n_bins=n_bins) for j in range(X.shape[1])], axis=1)
    mi = np.zeros((X.shape[1], len(factors)))
    for f, col in enumerate(factors):
        ok = meta[col].notna().to_numpy()
        labels = meta[col].astype(str).to_numpy()[ok]
        scale = _entropy(labels) if normalize == "factor_entropy" else 1.0
        for j in range(X.shape[1]):
            mi[j, f] = mutual_information(binned[ok, j], labels) / (scale or 1.0)
    top = mi.argmax(axis=1)
    table = pd.DataFrame(
        {
            "feature": np.repeat(names, len(factors)),
            "factor": np.tile(list(factors), len(names)),
            "mi": mi.ravel(),
            "is_top": (top[:, None] == np.arange(len(factors))[None, :]).ravel(),
        }
    )
    counts = np.bincount(top, minlength=len(factors))
    summary = pd.DataFrame(
        {
            "factor": list(factors),
            "n_features_top": counts,
            "fraction_top": counts / X.shape[1],
            "mean_mi": mi.mean(axis=0),
            "n_bins": n_bins,
            "normalize": normalize,
        }
    )
    return table, summary
