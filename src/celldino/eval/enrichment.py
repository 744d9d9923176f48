"""Folds of enrichment: are same-MoA pairs over-represented among the most similar pairs?

All pairs of profiles (treatment profiles, usually) are ranked by cosine similarity; the top
`percentile` % form the 'top' set. The 2×2 table (same MoA / different MoA × top / rest) gives
the odds ratio (a·d)/(b·c) and the one-sided Fisher's exact p-value (alternative: enriched),
as in Rohban et al. 2017 and Moshkov et al. 2024. Pairs of the same compound are left out by
default (other doses of one compound are trivially similar) and controls are excluded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.stats

from celldino.eval.map import check_inputs
from celldino.eval.spec import drop_controls, profiles_of

if TYPE_CHECKING:
    from anndata import AnnData

MAX_PROFILES = 20000  # all pairs are held in memory: aggregate wells into treatments first


def _same_label(values: pd.Series, sep: str | None) -> np.ndarray:
    """(n, n) bool: two rows share a label (any shared label when `sep` splits label sets)."""
    if sep is None:
        codes = pd.factorize(values)[0]
        return codes[:, None] == codes[None, :]
    sets = [{s.strip() for s in str(v).split(sep) if s.strip()} for v in values]
    vocab = sorted(set().union(*sets))
    onehot = np.zeros((len(sets), len(vocab)), dtype=np.int32)
    index = {lab: k for k, lab in enumerate(vocab)}
    for i, s in enumerate(sets):
        onehot[i, [index[lab] for lab in s]] = 1
    return (onehot @ onehot.T) > 0


def enrichment(
    meta: pd.DataFrame | AnnData,
    X=None,
    *,
    moa: str,
    compound: str | None = None,
    percentiles: Sequence[float] = (1.0,),
    control: str | None = "Metadata_pert_type",
    control_value: str = "control",
    moa_sep: str | None = None,
) -> pd.DataFrame:
    """Odds ratio and one-sided Fisher p-value of same-MoA pairs in the top `percentiles` %.

    One row per percentile: `percentile`, `n_pairs`, `n_top`, `similarity_cutoff` (the lowest
    similarity in the top set), `same_top`, `diff_top`, `same_rest`, `diff_rest`,
    `odds_ratio` (inf when no different-MoA pair is in the top set) and `p_value`.
    """
    meta, X = profiles_of(meta, X)
    meta = meta.reset_index(drop=True)
    cols = [moa] + ([compound] if compound else [])
    X = check_inputs(meta, X, cols)
    meta, X = drop_controls(meta, X, control=control, control_value=control_value)
    n = len(X)
    if n > MAX_PROFILES:
        raise ValueError(
            f"enrichment over {n} profiles needs {n * (n - 1) // 2} pairs in memory: aggregate "
            f"wells into treatment profiles first (at most {MAX_PROFILES})"
        )
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    iu, ju = np.triu_indices(n, k=1)
    sim = (Xn @ Xn.T)[iu, ju]  # (n_pairs,)
    same = _same_label(meta[moa], moa_sep)[iu, ju]
    if compound:
        cpd = pd.factorize(meta[compound])[0]
        valid = cpd[iu] != cpd[ju]
        sim, same = sim[valid], same[valid]
    n_pairs = len(sim)
    if n_pairs == 0:
        raise ValueError("no pairs of different compounds to rank")
    order = np.argsort(-sim, kind="stable")
    rows = []
    for pct in percentiles:
        if not 0 < pct <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {pct}")
        n_top = max(1, int(np.ceil(n_pairs * pct / 100.0)))
        top = np.zeros(n_pairs, dtype=bool)
        top[order[:n_top]] = True
        a = int((same & top).sum())
        b = int((~same & top).sum())
        c = int((same & ~top).sum())
        d = int((~same & ~top).sum())
        with np.errstate(divide="ignore", invalid="ignore"):
            odds = np.float64(a * d) / np.float64(b * c)
        # P(X >= a), X ~ hypergeometric(pairs, same-MoA pairs, top pairs)
        p = float(scipy.stats.hypergeom.sf(a - 1, n_pairs, a + c, n_top))
        rows.append(
            {
                "percentile": float(pct),
                "n_pairs": n_pairs,
                "n_top": n_top,
                "similarity_cutoff": float(sim[order[n_top - 1]]),
                "same_top": a,
                "diff_top": b,
                "same_rest": c,
                "diff_rest": d,
                "odds_ratio": float(odds),
                "p_value": min(1.0, p),
            }
        )
    return pd.DataFrame(rows)
