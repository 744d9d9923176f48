"""Single-cell heterogeneity: which treatments (or genes) give a mixed population of cells.

Following Cell-DINO's single-cell variability analysis: features are z-scored over all cells, the
standard deviation of each feature is taken over the cells of one field of view (one image), and
averaged over features into a field score; a treatment's score is the maximum over its fields
(a treatment is heterogeneous if any of its images shows a mixed population). Ranking treatments
by that score, precision in the top k against an annotation of known heterogeneous treatments
tells whether the features see cell-to-cell variation.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from celldino import log
from celldino.eval.classify import as_matrix
from celldino.eval.spec import NotEvaluable, profiles_of
from celldino.eval.splits import group_labels

if TYPE_CHECKING:
    from anndata import AnnData

logger = log.get_logger(__name__)


def field_std(
    meta: pd.DataFrame | AnnData,
    X=None,
    *,
    fields: Sequence[str] = ("Metadata_Plate", "Metadata_Well", "Metadata_Site"),
    treatment: str = "Metadata_Compound",
    standardize: bool = True,
    reduce: str = "mean",
    min_cells: int = 3,
) -> pd.DataFrame:
    """One row per field: field, treatment, n_cells, score (std over cells, reduced over features).

    Fields with fewer than `min_cells` cells are dropped (their std is noise).
    """
    meta, X = profiles_of(meta, X)
    if reduce not in ("mean", "median", "max"):
        raise ValueError(f"reduce must be mean, median or max, got {reduce!r}")
    if treatment not in meta.columns:
        raise KeyError(f"treatment column '{treatment}' not in the metadata")
    X = as_matrix(X, len(meta)).astype(np.float64)
    if standardize:
        sd = X.std(axis=0)
        sd[sd == 0] = 1.0
        X = (X - X.mean(axis=0)) / sd
    per_field = group_labels(meta, list(fields))
    names, inv = np.unique(per_field, return_inverse=True)
    n = np.bincount(inv)
    s1 = np.zeros((len(names), X.shape[1]))
    s2 = np.zeros_like(s1)
    np.add.at(s1, inv, X)
    np.add.at(s2, inv, X**2)
    with np.errstate(invalid="ignore", divide="ignore"):
        var = (s2 - s1**2 / n[:, None]) / (n[:, None] - 1)  # unbiased (ddof=1)
    std = np.sqrt(np.clip(var, 0, None))
    score = {"mean": np.mean, "median": np.median, "max": np.max}[reduce](std, axis=1)
    treat = (
        pd.Series(meta[treatment].astype(str).to_numpy())
        .groupby(inv)
        .agg(lambda s: s.iloc[0] if s.nunique() == 1 else "|".join(sorted(s.unique())))
    )
    out = pd.DataFrame(
        {"field": names, "treatment": treat.to_numpy(), "n_cells": n, "score": score}
    )
    return out[out.n_cells >= min_cells].reset_index(drop=True)


def treatment_heterogeneity(per_field: pd.DataFrame) -> pd.DataFrame:
    """Per treatment: max field score, number of fields, rank (1 = most heterogeneous)."""
    t = (
        per_field.groupby("treatment")
        .agg(score=("score", "max"), n_fields=("field", "size"), n_cells=("n_cells", "sum"))
        .reset_index()
        .sort_values(["score", "treatment"], ascending=[False, True])
        .reset_index(drop=True)
    )
    t["rank"] = np.arange(1, len(t) + 1)
    return t


def precision_at_k(ranked: Sequence[str], annotated: Iterable[str], k: int) -> float:
    """Fraction of the first k ranked items that are annotated."""
    if k < 1:
        raise ValueError("k must be ≥ 1")
    top = list(ranked)[:k]
    pos = set(map(str, annotated))
    return sum(str(x) in pos for x in top) / len(top) if top else float("nan")


def heterogeneity(
    meta: pd.DataFrame | AnnData,
    X=None,
    *,
    fields: Sequence[str] = ("Metadata_Plate", "Metadata_Well", "Metadata_Site"),
    treatment: str = "Metadata_Compound",
    annotated: Iterable[str] | None = None,
    annotation: str | None = None,
    exclude: Iterable[str] = (),
    ks: Sequence[int] = (5, 10),
    standardize: bool = True,
    reduce: str = "mean",
    min_cells: int = 3,
) -> tuple[pd.DataFrame, dict]:
    """Ranked treatments and precision@k against the annotated heterogeneous treatments.

    The annotation is either a list (`annotated`) or a boolean-like metadata column
    (`annotation`, true for cells of heterogeneous treatments). Treatments in `exclude`
    (e.g. the negative control) are left out of the ranking.
    """
    meta, X = profiles_of(meta, X)
    per_field = field_std(
        meta,
        X,
        fields=fields,
        treatment=treatment,
        standardize=standardize,
        reduce=reduce,
        min_cells=min_cells,
    )
    ranked = treatment_heterogeneity(per_field)
    ranked = ranked[~ranked.treatment.isin([str(e) for e in exclude])].reset_index(drop=True)
    ranked["rank"] = np.arange(1, len(ranked) + 1)
    if annotation is not None:
        if annotation not in meta.columns:
            raise KeyError(f"annotation column '{annotation}' not in the metadata")
        flag = meta[annotation].astype(str).str.lower().isin(["1", "true", "yes"])
        annotated = meta.loc[flag.to_numpy(), treatment].astype(str).unique()
    summary: dict = {"n_treatments": int(len(ranked)), "n_fields": int(len(per_field))}
    if annotated is not None:
        pos = set(map(str, annotated))
        ranked["annotated"] = ranked.treatment.isin(pos)
        summary["n_annotated"] = int(ranked.annotated.sum())
        unmatched = sorted(pos - set(ranked.treatment))
        given = f"column '{annotation}'" if annotation is not None else "list"
        if not summary["n_annotated"]:  # precision 0.0 would read as a result, not a typo
            raise NotEvaluable(
                f"heterogeneity: no ranked {treatment} value is in the annotation {given} "
                f"({len(pos)} name(s){': ' + ', '.join(unmatched[:5]) if unmatched else ''}); "
                f"ranked values are e.g. {', '.join(ranked.treatment[:5].astype(str))}: name "
                "treatments as the profiles do (excluded controls and treatments with fewer than "
                "min_cells cells per field are not ranked)"
            )
        if unmatched:
            logger.warning(
                "heterogeneity: %d of the %d annotated treatment(s) are not ranked (%s): not in "
                "%s, excluded, or too few cells; precision@k counts the %d that are",
                len(unmatched),
                len(pos),
                ", ".join(unmatched[:5]),
                treatment,
                summary["n_annotated"],
            )
        summary["n_annotated_unranked"] = len(unmatched)
        for k in ks:
            summary[f"precision_at_{k}"] = precision_at_k(ranked.treatment, pos, k)
    return ranked, summary
