"""NSC and NSCB: 1-nearest-neighbour MoA matching of treatment profiles (Ljosa et al. 2013).

Each treatment profile (one compound at one dose; wells aggregated first) is assigned the MoA of
its most cosine-similar other treatment. NSC ("not same compound") ignores neighbours of the same
compound, so a compound cannot match its own other doses; NSCB ("not same compound or batch")
also ignores neighbours from the same batch, so batch effects cannot help. Treatments whose MoA
occurs in only one batch cannot have a correct NSCB neighbour and are removed from the NSCB
evaluation (as queries and as neighbours), as in the literature. Likewise a treatment whose
MoA has no other compound (NSC) is not scored as a query, as no profile could match it (it stays
a possible neighbour of the others): such MoAs would only lower every method's score by the same
amount (on BBBC021's odd weeks alone 15 of 71 treatments). Controls are excluded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from celldino.eval.map import check_inputs
from celldino.eval.spec import as_anndata, drop_controls, profiles_of
from celldino.eval.stats import empty_stats, nsc_statistics, rng_for, warn_flags
from celldino.log import get_logger

if TYPE_CHECKING:
    from anndata import AnnData

logger = get_logger(__name__)


def treatment_profiles(
    meta: pd.DataFrame, X: np.ndarray, *, by: Sequence[str], how: str = "median"
) -> tuple[pd.DataFrame, np.ndarray]:
    """One profile per group of `by` (median or mean of its rows), by `celldino.pp.consensus`:
    (metadata: the `by` columns and `Metadata_Count_Replicates`, features (groups, d) float64),
    groups in sorted order of `by`. Missing keys, NaN/inf and all-zero rows are refused first."""
    from celldino.pp.consensus import consensus

    by = list(by)
    X = check_inputs(meta, X, by)
    meta, X = profiles_of(consensus(as_anndata(meta[by], X), by=by, method=how))
    return meta, np.asarray(X, dtype=np.float64)


def _label_sets(values: pd.Series, sep: str | None) -> list[frozenset]:
    if sep is None:
        return [frozenset([str(v)]) for v in values]
    return [frozenset(s.strip() for s in str(v).split(sep) if s.strip()) for v in values]


def _shares_label(labels: list[frozenset]) -> np.ndarray:
    """(n, n) bool: treatments i and j share at least one MoA label."""
    names = sorted(set().union(*labels)) if labels else []
    index = {c: k for k, c in enumerate(names)}
    L = np.zeros((len(labels), len(names)), dtype=np.float64)
    for i, s in enumerate(labels):
        L[i, [index[c] for c in s]] = 1.0
    return (L @ L.T) > 0


@dataclass(frozen=True)
class MatchResult:
    """Accuracy of 1-NN MoA matching and the per-treatment table behind it."""

    accuracy: float  # fraction of queries whose nearest allowed neighbour shares a MoA
    n_queries: int  # treatments evaluated
    table: pd.DataFrame  # one row per query: neighbour, similarity, predicted MoA, correct, chance
    stats: dict = field(default_factory=dict)  # chance, ci_low, ci_high, p_perm, ... (eval.stats)


def nearest_moa(
    meta: pd.DataFrame | AnnData,
    X=None,
    *,
    moa: str,
    compound: str,
    batch: str | None = None,
    moa_sep: str | None = None,
    n_boot: int = 0,
    n_perm: int = 0,
    seed: int = 0,
) -> MatchResult:
    """1-NN MoA matching of the given rows (already treatment profiles; no controls).

    Neighbours of the same compound are excluded (NSC); with `batch`, neighbours of the same
    batch are excluded too and queries whose MoA lives in one batch only are dropped (NSCB).
    With `moa_sep` (e.g. '|'), MoA strings are label sets and a match is any shared label.
    `stats` holds the chance level (exact), a compound bootstrap interval (`n_boot`
    resamples) and a permutation p-value (`n_perm` shuffles of MoA among compounds), see
    `celldino.eval.stats.nsc_statistics`; the table's `chance` is each query's.
    """
    name = "NSCB" if batch else "NSC"
    meta, X = profiles_of(meta, X)
    cols = [moa, compound] + ([batch] if batch else [])
    X = check_inputs(meta, X, cols)
    meta = meta.reset_index(drop=True)
    keep = np.ones(len(meta), dtype=bool)
    if batch:
        n_batches = meta.groupby(moa, observed=True)[batch].nunique()
        single = meta[moa].map(n_batches).to_numpy() < 2
        if single.any():
            logger.info(
                "NSCB: %d treatments of %d MoA(s) found in one batch only are excluded",
                int(single.sum()),
                int(meta.loc[single, moa].nunique()),
            )
        keep = ~single
    meta, X = meta[keep].reset_index(drop=True), X[keep]
    n = len(meta)
    if n < 2:
        logger.warning(
            "1-NN matching%s: %d treatment(s) left, nothing to match (accuracy NaN)",
            " across batches" if batch else "",
            n,
        )
        flags = [f"{n} treatment(s) left, nothing to match"]
        warn_flags(name, flags)
        return MatchResult(
            accuracy=float("nan"),
            n_queries=0,
            table=meta[cols].iloc[:0].assign(query=np.zeros(0, dtype=np.int64)),
            stats=empty_stats(0, flags),
        )
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    sim = Xn @ Xn.T  # (n, n) cosine similarity
    cpd = pd.factorize(meta[compound])[0]
    allowed = cpd[:, None] != cpd[None, :]  # also excludes the query itself
    if batch:
        bat = pd.factorize(meta[batch])[0]
        allowed &= bat[:, None] != bat[None, :]
    sim = np.where(allowed, sim, -np.inf)
    nn = np.argmax(sim, axis=1)
    share = _shares_label(_label_sets(meta[moa], moa_sep))
    # a query no method can match (no allowed neighbour shares its MoA: the MoA's only
    # compound, or for NSCB its only batch) measures the data set, not the profiles: not scored
    has = (allowed & share).any(axis=1)
    unmatched = allowed.any(axis=1) & ~has
    if unmatched.any():
        logger.info(
            "%s: %d treatment(s) of %d MoA(s) with no other compound%s are not scored as "
            "queries (no neighbour could share their MoA)",
            name,
            int(unmatched.sum()),
            int(meta.loc[unmatched, moa].nunique()),
            " in another batch" if batch else "",
        )
    correct = share[np.arange(n), nn] & has
    stats, chance = nsc_statistics(
        share,
        allowed,
        nn,
        np.flatnonzero(has),
        meta[compound].to_numpy(),
        n_boot=n_boot,
        n_perm=n_perm,
        rng=rng_for(seed, name),
    )
    warn_flags(name, [stats["flags"]])
    table = meta[cols].copy()
    table["query"] = np.arange(n)  # row of the (kept) treatments
    table["neighbour"] = np.where(has, nn, -1)
    table["neighbour_compound"] = np.where(has, meta[compound].to_numpy()[nn], None)
    table["predicted_moa"] = np.where(has, meta[moa].to_numpy()[nn], None)
    table["similarity"] = np.where(has, sim[np.arange(n), nn], np.nan)
    table["correct"] = correct
    table = table[has].reset_index(drop=True)
    table["chance"] = chance
    if (~allowed.any(axis=1)).any():
        logger.warning(
            "%d treatments have no allowed neighbour and are skipped",
            int((~allowed.any(axis=1)).sum()),
        )
    acc = float(table["correct"].mean()) if len(table) else float("nan")
    return MatchResult(accuracy=acc, n_queries=len(table), table=table, stats=stats)


def nsc_nscb(
    meta: pd.DataFrame | AnnData,
    X=None,
    *,
    moa: str,
    compound: str,
    treatment: Sequence[str] | None = None,
    batch: str | None = None,
    control: str | None = "Metadata_pert_type",
    control_value: str = "control",
    aggregate: str = "median",
    moa_sep: str | None = None,
    n_boot: int = 0,
    null_size: int = 0,
    seed: int = 0,
    return_stats: bool = False,
):
    """NSC (and NSCB when `batch` is given) accuracy, plus the per-treatment table; with
    `return_stats`, also {"NSC": stats, "NSCB": stats} (chance level, compound-bootstrap
    interval of `n_boot` resamples, p-value of `null_size` MoA shuffles: `nearest_moa`).

    `treatment` lists the columns that define a treatment (e.g. compound and dose): rows are
    aggregated by treatment first (for NSCB by treatment and batch, so a treatment seen in two
    batches gives two profiles); None means the rows already are treatments.
    Controls (`control == control_value`) are dropped first.
    """
    meta, X = profiles_of(meta, X)
    X = np.asarray(X, dtype=np.float64)
    meta, X = drop_controls(meta, X, control=control, control_value=control_value)
    m_nsc, X_nsc = meta, X
    if treatment:  # NSC: one profile per treatment, over all batches
        keys = list(dict.fromkeys([*treatment, compound, moa]))
        m_nsc, X_nsc = treatment_profiles(meta, X, by=keys, how=aggregate)
    kw = dict(moa=moa, compound=compound, moa_sep=moa_sep, n_boot=n_boot, n_perm=null_size)
    res = nearest_moa(m_nsc, X_nsc, seed=seed, **kw)
    stats = {"NSC": res.stats}
    metrics = {"NSC": res.accuracy, "NSC_n": float(res.n_queries)}
    tables = [res.table.assign(metric="NSC")]
    if batch:
        m_b, X_b = meta, X
        if treatment:  # NSCB: one profile per treatment and batch
            keys = list(dict.fromkeys([*treatment, compound, moa, batch]))
            m_b, X_b = treatment_profiles(meta, X, by=keys, how=aggregate)
        res_b = nearest_moa(m_b, X_b, batch=batch, seed=seed, **kw)
        stats["NSCB"] = res_b.stats
        metrics |= {"NSCB": res_b.accuracy, "NSCB_n": float(res_b.n_queries)}
        tables.append(res_b.table.assign(metric="NSCB"))
    table = pd.concat(tables, ignore_index=True)
    return (metrics, table, stats) if return_stats else (metrics, table)
