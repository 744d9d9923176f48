"""Mean average precision (mAP) of profile retrieval, as defined by copairs, in bounded memory.

Every profile is a query; its *positives* and *negatives* are the other profiles that satisfy
metadata rules (copairs' `sameby` / `diffby`: share every `sameby` column, differ in every
`diffby` column). Candidates are ranked by cosine similarity to the query and the average
precision (AP) of the positives in that ranking is the query's score; mAP averages the APs of a
group (a compound, a compound at one dose, a MoA) and a permutation null gives its p-value.

`average_precision` gives the same numbers as `copairs.map.average_precision` wherever no
positive ties a negative: similarities are rounded to float32 and ranked by `1 - similarity` in
float32. Ties are where the two differ. copairs (0.5) ranks positives before negatives at equal
similarity (its stable `lexsort`), so a collapsed embedding (every profile the same) scores AP 1.0
on every query. celldino scores a tie as its average over every order of the tied candidates
(the expected AP of breaking ties at random, `_tie_precision`), so identical profiles score the
chance level, `expected_ap`, exactly. `method="auto"` therefore uses copairs only where no two
candidates of a query tie (`has_ties`); `method="copairs"` keeps copairs' own numbers. Features
are used in float64 for both backends. copairs builds every positive and negative pair in memory (it was
killed at ~9,000 profiles on a 14 GB machine), so above `copairs_max_rows` profiles the blocked
backend ranks one block of queries against all profiles at a time: memory grows as
block × profiles, not profiles².

`mean_average_precision` reproduces copairs' null distributions (same seeds, same random
stream) while drawing them in chunks, then its p-values and Benjamini-Hochberg FDR.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.stats
import torch

from celldino.errors import DataError
from celldino.eval.spec import drop_controls, is_control_row, profiles_of
from celldino.eval.stats import expected_ap, map_statistics, rng_for, warn_flags
from celldino.log import get_logger, progress

if TYPE_CHECKING:
    from anndata import AnnData

logger = get_logger(__name__)


class Unpaired(DataError):
    """No positive (or negative) pair in the profiles: this mAP cannot be computed here."""


def _unpaired(kind: str, sameby: list[str], diffby: list[str]) -> str:
    sameby = [c for c in sameby if not str(c).startswith("_celldino")]  # internal helper columns
    diffby = [c for c in diffby if not str(c).startswith("_celldino")]
    same = f"share {sameby}" if sameby else ""
    diff = f"differ in {diffby}" if diffby else ""
    return (
        f"no {kind} pairs: no two profiles {' and '.join(x for x in (same, diff) if x)} "
        f"({'e.g. a single replicate per group' if kind == 'positive' else 'e.g. one group only'})"
    )


COPAIRS_MAX_ROWS = 2000  # `method="auto"` uses copairs up to this many profiles
BLOCK_BYTES = 256 * 2**20  # working memory for one block of queries (blocked backend)


# ---- inputs ----------------------------------------------------------------------------------


def _as_list(cols: str | Sequence[str] | None) -> list[str]:
    if cols is None:
        return []
    return [cols] if isinstance(cols, str) else list(cols)


def check_inputs(meta: pd.DataFrame, X: np.ndarray, columns: Sequence[str]) -> np.ndarray:
    """Validate metadata columns and features; return the features as float64 (n, d)."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"features must be a 2-D array (profiles, features), got shape {X.shape}")
    if len(meta) != len(X):
        raise ValueError(f"metadata has {len(meta)} rows but features have {len(X)}")
    for c in columns:
        if c not in meta.columns:
            raise KeyError(f"column '{c}' is not in the metadata; available: {list(meta.columns)}")
        if meta[c].isna().any():
            rows = np.flatnonzero(meta[c].isna().to_numpy())[:5].tolist()
            raise ValueError(
                f"metadata column '{c}' has missing values (rows {rows}); fill them "
                "(e.g. controls: fillna('DMSO')) or drop those rows"
            )
    bad = ~np.isfinite(X).all(axis=1)
    if bad.any():
        raise ValueError(
            f"features have NaN/inf in rows {np.flatnonzero(bad)[:5].tolist()}: impute or drop them"
        )
    zero = np.linalg.norm(X, axis=1) == 0
    if zero.any():
        raise ValueError(
            f"profiles {np.flatnonzero(zero)[:5].tolist()} are all-zero: cosine similarity is "
            "undefined; drop them"
        )
    return X


def _codes(meta: pd.DataFrame, cols: list[str]) -> list[torch.Tensor]:
    return [torch.from_numpy(pd.factorize(meta[c])[0].astype(np.int64)) for c in cols]


def _rule_mask(
    codes_same: list[torch.Tensor], codes_diff: list[torch.Tensor], rows: slice, n: int
) -> torch.Tensor:
    """(B, n) bool: rows share every `sameby` code and differ in every `diffby` code."""
    r = torch.arange(rows.start, rows.stop)
    mask = torch.ones((len(r), n), dtype=torch.bool)
    for c in codes_same:
        mask &= c[r, None] == c[None, :]
    for c in codes_diff:
        mask &= c[r, None] != c[None, :]
    mask[torch.arange(len(r)), r] = False  # a profile is never its own pair
    return mask


# ---- average precision ------------------------------------------------------------------------


SORT_ABOVE_POSITIVES = 32  # above this many positives per query, sort whole rows (no top-k)
_EULER = 0.5772156649015329


def _harmonic(x: torch.Tensor) -> torch.Tensor:
    """H(x) = 1 + 1/2 + ... + 1/x for integer-valued float64 x >= 0 (digamma(x + 1) + γ)."""
    return torch.special.digamma(x + 1) + _EULER


def _tie_precision(
    j: torch.Tensor,
    p_less: torch.Tensor,
    p_eq: torch.Tensor,
    n_less: torch.Tensor,
    n_eq: torch.Tensor,
) -> torch.Tensor:
    """One positive's precision term, averaged over every order of its tie group (float64).

    The positive is the `j`-th (1-based) positive of its query; `p_less` positives and `n_less`
    negatives rank strictly before it, and its tie group (equal key) holds `p_eq` positives (it
    included) and `n_eq` negatives. Without a tied negative the term is copairs' `j / (j +
    n_less)`. With one, the group's m = p_eq + n_eq places are equally likely to hold each of its
    positives: position k of the group is a positive with probability p_eq / m, and then the
    expected number of positives up to it is a + b (k - 1), with a = p_less + 1 and b = (p_eq -
    1) / (m - 1); its precision divides by c + k, c = p_less + n_less. Each of the p_eq positives
    takes an equal share of the group's sum over k:
    (1 / m) Σ_k (a + b (k - 1)) / (c + k) = [(a - b - b c) (H(c + m) - H(c)) + b m] / m.
    """
    j, p_less, p_eq, n_less, n_eq = (t.to(torch.float64) for t in (j, p_less, p_eq, n_less, n_eq))
    direct = j / (j + n_less)
    m = p_eq + n_eq
    a, c = p_less + 1, p_less + n_less
    b = (p_eq - 1) / torch.clamp(m - 1, min=1)
    tied = ((a - b - b * c) * (_harmonic(c + m) - _harmonic(c)) + b * m) / torch.clamp(m, min=1)
    return torch.where(n_eq > 0, tied, direct)


def _ap_block(
    sim: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AP of each query row of a (B, n) similarity block: copairs' ranking, ties averaged."""
    key = 1 - sim.to(torch.float32)  # (B, n): copairs ranks float32 `1 - similarity`
    num_pos = pos.sum(dim=1)  # (B,)
    total = num_pos + neg.sum(dim=1)
    max_pos = int(num_pos.max()) if len(pos) else 0
    ap = torch.zeros(len(key), dtype=torch.float64)
    if max_pos > 0:
        ap = _precision_sum(*_sorted_keys(key, pos, neg, max_pos), num_pos)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = ap.numpy() / num_pos.numpy()
    out[(num_pos == 0).numpy()] = np.nan
    return out, num_pos.numpy(), total.numpy()


def _sorted_keys(
    key: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, max_pos: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's `max_pos` smallest positive keys and all its negative keys, ascending (inf
    where a candidate is not one). `key` (..., n) and the masks broadcast. Few positives: the
    smallest by `topk`; many: one full sort is faster."""
    inf = torch.tensor(float("inf"), dtype=key.dtype)
    pos_key = torch.where(pos, key, inf)
    if max_pos <= SORT_ABOVE_POSITIVES:
        pos_keys = torch.topk(pos_key, max_pos, dim=-1, largest=False).values
    else:
        pos_keys = torch.sort(pos_key, dim=-1).values[..., :max_pos]
    del pos_key
    return pos_keys.contiguous(), torch.sort(torch.where(neg, key, inf), dim=-1).values


def _precision_sum(
    pos_keys: torch.Tensor, neg_sorted: torch.Tensor, num_pos: torch.Tensor
) -> torch.Tensor:
    """Σ of each query's precision terms (float64): the rank of its j-th best positive is j plus
    the negatives with a strictly smaller key (a binary search in its sorted negative keys); a
    negative with an equal key makes the term its average over the tie (`_tie_precision`).
    `pos_keys` (..., max_pos) of which the first `num_pos` (...,) are positives."""
    less = torch.searchsorted(neg_sorted, pos_keys)  # negatives strictly before
    n_eq = torch.searchsorted(neg_sorted, pos_keys, right=True) - less
    p_less = torch.searchsorted(pos_keys, pos_keys)
    p_eq = torch.searchsorted(pos_keys, pos_keys, right=True) - p_less
    j = torch.arange(1, pos_keys.shape[-1] + 1)
    prec = _tie_precision(j.expand_as(less), p_less, p_eq, less, n_eq)
    return torch.where(j <= num_pos[..., None], prec, 0.0).sum(dim=-1)


def has_ties(X: np.ndarray) -> bool:
    """True when some profile has two others at the same float32 `1 - cosine similarity` (the
    key copairs ranks by): there copairs' ranking and celldino's tie average differ."""
    Xn = torch.from_numpy(X / np.linalg.norm(X, axis=1, keepdims=True))
    key = 1 - (Xn @ Xn.T).to(torch.float32)
    key.fill_diagonal_(float("nan"))  # a profile is not its own candidate; NaN equals nothing
    key = torch.sort(key, dim=1).values
    return bool((key[:, 1:] == key[:, :-1]).any())


def _block_rows(n: int, block_bytes: int) -> int:
    # about 40 bytes per (query, candidate) cell live at once in _ap_block and the masks
    return int(max(1, min(n, block_bytes // max(1, 40 * n))))


def normalized_ap(ap: np.ndarray, num_pos: np.ndarray, total: np.ndarray) -> np.ndarray:
    """(AP - E[AP]) / (1 - E[AP]) clipped to [-1, 1], as copairs' `normalize_ap`."""
    mu0 = expected_ap(num_pos, total)
    return np.clip((np.asarray(ap) - mu0) / np.maximum(1 - mu0, 1e-10), -1.0, 1.0)


def _average_precision_blocked(
    meta: pd.DataFrame,
    X: np.ndarray,
    pos_sameby: list[str],
    pos_diffby: list[str],
    neg_sameby: list[str],
    neg_diffby: list[str],
    block_bytes: int,
    show_progress: bool,
) -> pd.DataFrame:
    n = len(X)
    Xn = torch.from_numpy(X / np.linalg.norm(X, axis=1, keepdims=True))  # (n, d) unit rows
    ps, pd_, ns, nd = (_codes(meta, c) for c in (pos_sameby, pos_diffby, neg_sameby, neg_diffby))
    ap = np.full(n, np.nan)
    num_pos = np.zeros(n, dtype=np.int64)
    total = np.zeros(n, dtype=np.int64)
    step = _block_rows(n, block_bytes)
    starts = range(0, n, step)
    for start in progress(starts, desc="average precision", disable=not show_progress):
        rows = slice(start, min(n, start + step))
        pos = _rule_mask(ps, pd_, rows, n)  # (B, n)
        neg = _rule_mask(ns, nd, rows, n)
        if (pos & neg).any():
            raise ValueError(
                "the positive and negative rules overlap (a pair is both): add the positive "
                "`sameby` columns to the negative `diffby` columns"
            )
        sim = Xn[rows] @ Xn.T  # (B, n) cosine similarity, float64
        ap[rows], num_pos[rows], total[rows] = _ap_block(sim, pos, neg)
    if num_pos.sum() == 0:
        raise Unpaired(_unpaired("positive", pos_sameby, pos_diffby))
    if (total - num_pos).sum() == 0:
        raise Unpaired(_unpaired("negative", neg_sameby, neg_diffby))
    out = meta.reset_index(drop=True).copy()
    out["n_pos_pairs"] = num_pos
    out["n_total_pairs"] = total
    out["average_precision"] = ap
    paired = total > 0
    norm = np.full(n, np.nan)
    norm[paired] = normalized_ap(ap[paired], num_pos[paired], total[paired])
    out["normalized_average_precision"] = norm
    return out


def average_precision(
    meta: pd.DataFrame | AnnData,
    X=None,
    *,
    pos_sameby: Sequence[str],
    pos_diffby: Sequence[str] = (),
    neg_sameby: Sequence[str] = (),
    neg_diffby: Sequence[str] = (),
    method: str = "auto",
    copairs_max_rows: int = COPAIRS_MAX_ROWS,
    block_bytes: int = BLOCK_BYTES,
    show_progress: bool = True,
) -> pd.DataFrame:
    """AP of every profile (cosine similarity), with copairs' columns and numbers.

    Returns `meta` (index reset) plus `n_pos_pairs`, `n_total_pairs`, `average_precision`
    (NaN without positives) and `normalized_average_precision`. `method` is `copairs`,
    `blocked` or `auto` (copairs up to `copairs_max_rows` profiles without ties, else blocked):
    the two agree except at ties, which copairs ranks positives first and blocked averages.
    """
    meta, X = profiles_of(meta, X)
    pos_sameby, pos_diffby = _as_list(pos_sameby), _as_list(pos_diffby)
    neg_sameby, neg_diffby = _as_list(neg_sameby), _as_list(neg_diffby)
    if not (pos_sameby or pos_diffby) or not (neg_sameby or neg_diffby):
        raise ValueError("the positive and the negative rule each need at least one column")
    X = check_inputs(meta, X, pos_sameby + pos_diffby + neg_sameby + neg_diffby)
    if method == "auto":  # copairs ranks ties positives first: tied profiles go to `blocked`
        small = len(X) <= copairs_max_rows
        method = "copairs" if small and not has_ties(X) else "blocked"
    if method == "blocked":
        return _average_precision_blocked(
            meta, X, pos_sameby, pos_diffby, neg_sameby, neg_diffby, block_bytes, show_progress
        )
    if method != "copairs":
        raise ValueError(f"unknown mAP method '{method}' (use auto, copairs or blocked)")
    from copairs.map import average_precision as copairs_ap
    from copairs.matching import UnpairedException

    try:
        out = copairs_ap(
            meta.reset_index(drop=True),
            X,
            pos_sameby=pos_sameby,
            pos_diffby=pos_diffby,
            neg_sameby=neg_sameby,
            neg_diffby=neg_diffby,
            progress_bar=False,
        )
    except UnpairedException as e:
        kind = "negative" if "negative" in str(e).lower() else "positive"
        rule = (pos_sameby, pos_diffby) if kind == "positive" else (neg_sameby, neg_diffby)
        raise Unpaired(_unpaired(kind, *rule)) from None
    return out.astype({"n_pos_pairs": np.int64, "n_total_pairs": np.int64})


# ---- null distributions, p-values, FDR ------------------------------------------------------


def random_ap(null_size: int, num_pos: int, total: int, seed: int) -> np.ndarray:
    """copairs' `random_ap` (same random stream), drawn in chunks of rows to bound memory."""
    rng = np.random.default_rng(seed)
    dtype = np.uint16 if total < 2**16 else np.uint32
    chunk = max(1, (32 * 2**20) // max(1, total * np.dtype(dtype).itemsize))
    ranks_k = np.arange(1, num_pos + 1, dtype=np.float32)
    out = np.empty(null_size, dtype=np.float32)
    for start in range(0, null_size, chunk):
        rows = min(chunk, null_size - start)
        idx = np.tile(np.arange(total, dtype=dtype), (rows, 1))
        rng.permuted(idx, axis=1, out=idx)
        rel_k = np.sort(idx[:, :num_pos], axis=1)
        pr_k = ranks_k / (rel_k + 1)
        out[start : start + rows] = (pr_k.sum(axis=1) / num_pos).astype(np.float32)
    return out


def null_distributions(confs: np.ndarray, null_size: int, seed: int) -> np.ndarray:
    """(n_confs, null_size) float32 nulls for unique (num_pos, total) rows, as copairs seeds them."""
    seeds = np.random.default_rng(seed).integers(8096, size=len(confs))
    out = np.empty((len(confs), null_size), dtype=np.float32)
    for i in progress(range(len(confs)), desc="null distributions", disable=len(confs) < 50):
        num_pos, total = (int(v) for v in confs[i])
        out[i] = random_ap(null_size, num_pos, total, int(seeds[i]))
    return out


def mean_average_precision(
    ap: pd.DataFrame,
    *,
    sameby: Sequence[str],
    null_size: int = 10000,
    threshold: float = 0.05,
    seed: int = 0,
    method: str = "celldino",
) -> pd.DataFrame:
    """mAP per group of `sameby`, permutation p-value, BH-corrected p-value (copairs' table).

    Columns: the `sameby` columns, `mean_average_precision`, `indices`,
    `mean_normalized_average_precision`, `p_value`, `corrected_p_value`, `below_p`,
    `below_corrected_p`. `method="copairs"` calls copairs itself (its null cache goes to a
    temporary folder, not ~/.copairs); `celldino` computes the same numbers in bounded memory.
    """
    sameby = _as_list(sameby)
    if method == "copairs":
        from copairs.map import mean_average_precision as copairs_map

        with tempfile.TemporaryDirectory() as cache:
            return copairs_map(
                ap, sameby, null_size, threshold, seed, progress_bar=False, cache_dir=cache
            )
    if method != "celldino":
        raise ValueError(f"unknown p-value method '{method}' (use celldino or copairs)")
    scores = ap[ap["average_precision"].notna() & (ap["n_pos_pairs"] > 0)]
    scores = scores.reset_index(drop=True)
    if scores.empty:
        raise Unpaired("no profile has positives: nothing to average (check the pair rules)")
    confs, rev_ix = np.unique(
        scores[["n_pos_pairs", "n_total_pairs"]].to_numpy(), axis=0, return_inverse=True
    )
    rev_ix = rev_ix.ravel()
    nulls = null_distributions(confs, null_size, seed)
    out = scores.groupby(sameby, observed=True, as_index=False).agg(
        {
            "average_precision": ["mean", lambda x: list(x.index)],
            "normalized_average_precision": "mean",
        }
    )
    out.columns = [
        *sameby,
        "mean_average_precision",
        "indices",
        "mean_normalized_average_precision",
    ]
    pvals = []
    for map_score, indices in zip(out["mean_average_precision"], out["indices"]):
        null = nulls[rev_ix[indices]].mean(axis=0)
        pvals.append((int((null > map_score).sum()) + 1) / (null_size + 1))
    out["p_value"] = pvals
    out["corrected_p_value"] = scipy.stats.false_discovery_control(out["p_value"], method="bh")
    out["below_p"] = out["p_value"] < threshold
    out["below_corrected_p"] = out["corrected_p_value"] < threshold
    return out


def fraction_retrieved(map_scores: pd.DataFrame, threshold: float = 0.05) -> float:
    """Fraction of groups whose BH-corrected p-value is below `threshold`."""
    if len(map_scores) == 0:
        return math.nan
    return float((map_scores["corrected_p_value"] < threshold).mean())


def summarize(map_scores: pd.DataFrame, threshold: float = 0.05) -> dict[str, float]:
    """mAP (mean over groups), normalised mAP and fraction retrieved at `threshold`."""
    return {
        "mAP": float(map_scores["mean_average_precision"].mean()),
        "mAP_normalized": float(map_scores["mean_normalized_average_precision"].mean()),
        "fraction_retrieved": fraction_retrieved(map_scores, threshold),
        "n_groups": float(len(map_scores)),
    }


MAP_PERMUTATIONS = 200  # label permutations behind a summary mAP's p_perm (at most): p >= 1/201
PERM_MAX_ROWS = 4000  # above this many profiles the summary mAP gets no p_perm


def _ap_sorted(
    key: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, max_pos: int
) -> torch.Tensor:
    """AP of (R, q, n) ranking keys with fixed (q, n) positive / negative masks, as `_ap_block`
    ranks (ties averaged). (R, q) float64."""
    num = pos.sum(dim=-1)  # (q,)
    return _precision_sum(*_sorted_keys(key, pos, neg, max_pos), num) / num


def permuted_map_null(
    meta: pd.DataFrame,
    X: np.ndarray,
    *,
    pos_sameby: list[str],
    pos_diffby: list[str],
    neg_sameby: list[str],
    neg_diffby: list[str],
    sameby: list[str],
    n_perm: int,
    rng: np.random.Generator,
    block_bytes: int = BLOCK_BYTES,
) -> np.ndarray | None:
    """(n_perm,) summary mAPs (mean over `sameby` groups of their queries' mean AP) with the
    metadata rows shuffled against the feature rows: the pair rules stay as they are, each
    profile's similarities come from another profile. This keeps every dependence between
    queries (replicates rank each other, all queries share the negatives) that a per-query null
    ignores. None above `PERM_MAX_ROWS` profiles (each permutation ranks every profile)."""
    n = len(X)
    if n > PERM_MAX_ROWS or n_perm < 1:
        if n > PERM_MAX_ROWS:
            logger.info("mAP: %d profiles > %d, no permutation p-value", n, PERM_MAX_ROWS)
        return None
    Xn = torch.from_numpy(X / np.linalg.norm(X, axis=1, keepdims=True))
    S = (Xn @ Xn.T).to(torch.float32)  # (n, n), as copairs ranks float32 similarities
    ps, pd_, ns, nd = (_codes(meta, c) for c in (pos_sameby, pos_diffby, neg_sameby, neg_diffby))
    pos = _rule_mask(ps, pd_, slice(0, n), n)
    neg = _rule_mask(ns, nd, slice(0, n), n)
    q = torch.nonzero(pos.any(dim=1) & (pos | neg).any(dim=1)).ravel()
    if len(q) == 0:
        return None
    groups = pd.factorize(pd.Series(list(meta[sameby].itertuples(index=False, name=None))))[0]
    codes = groups[q.numpy()]
    codes = pd.factorize(codes)[0]
    G = int(codes.max()) + 1
    size = np.bincount(codes, minlength=G)
    pos_q, neg_q = pos[q], neg[q]
    max_pos = int(pos_q.sum(dim=1).max())
    b = max(1, min(n_perm, block_bytes // max(1, 40 * len(q) * n)))
    out = np.empty(n_perm)
    for s in range(0, n_perm, b):
        e = min(n_perm, s + b)
        perms = torch.from_numpy(rng.permuted(np.tile(np.arange(n), (e - s, 1)), axis=1))
        key = 1 - S[perms[:, q][:, :, None], perms[:, None, :]]  # (e-s, q, n) float32
        ap = _ap_sorted(key, pos_q, neg_q, max_pos).numpy()  # (e-s, q)
        gm = np.stack([np.bincount(codes, weights=a, minlength=G) for a in ap]) / size
        out[s:e] = gm.mean(axis=1)
    return out


def with_statistics(
    ap: pd.DataFrame,
    maps: pd.DataFrame,
    sameby: Sequence[str],
    *,
    null: np.ndarray | None,
    n_boot: int,
    seed: int = 0,
    control: str | None = None,
    control_value: str | Sequence[str] = "control",
    what: str = "mAP",
) -> tuple[pd.DataFrame, dict]:
    """The mAP table with each group's `chance` (mean expected AP of a random ranking),
    `ci_low` and `ci_high` (bootstrap of its queries), and the stats of the summary mAP (mean
    over groups): chance, interval, p-value against `null` (`permuted_map_null`), queries,
    flags (`celldino.eval.stats.map_statistics`). Control rows (never queries) are left out of
    the group count, so the groups dropped as singletons are the treatments'."""
    sameby = _as_list(sameby)
    if control and control in ap.columns:
        ap = ap[~is_control_row(ap, control, control_value)]
    st, per_group = map_statistics(
        ap, sameby, null=null, n_boot=n_boot, rng=rng_for(seed, what), what=what
    )
    warn_flags(what, [st["flags"]])
    maps = maps.drop(columns=[c for c in ("chance", "ci_low", "ci_high") if c in maps.columns])
    if len(per_group):
        maps = maps.merge(per_group, on=sameby, how="left")
    else:
        maps = maps.assign(chance=np.nan, ci_low=np.nan, ci_high=np.nan)
    return maps, st


def _with_stats(
    ap,
    maps,
    m,
    X,
    rules: dict,
    sameby,
    *,
    n_boot,
    n_perm,
    null_size,
    seed,
    what,
    block_bytes,
    control,
    control_value,
):
    """retrieval_map / moa_map with return_stats: (ap, maps with per-group columns, stats)."""
    n_perm = min(null_size, MAP_PERMUTATIONS) if n_perm is None else n_perm
    null = permuted_map_null(
        m,
        np.asarray(X, dtype=np.float64),
        **rules,
        sameby=_as_list(sameby),
        n_perm=n_perm,
        rng=rng_for(seed, f"{what} permutations"),
        block_bytes=block_bytes,
    )
    maps, st = with_statistics(
        ap,
        maps,
        sameby,
        null=null,
        n_boot=n_boot,
        seed=seed,
        control=control,
        control_value=control_value,
        what=what,
    )
    return ap, maps, st


# ---- retrieval tasks ----------------------------------------------------------------------------

_REF = "_celldino_ref"  # -1 for treatments, the row number for each control
_CTRL = "_celldino_is_control"


def _with_refs(meta: pd.DataFrame, by: list[str], is_ctrl: np.ndarray) -> pd.DataFrame:
    m = meta.reset_index(drop=True).copy()
    m[_REF] = np.where(is_ctrl, np.arange(len(m)), -1)
    m[_CTRL] = is_ctrl
    for c in by:  # controls often carry no compound/dose (NaN): give them a value
        if c in m.columns and m[c].isna().any():
            m[c] = m[c].astype(object).where(~(m[c].isna() & is_ctrl), "__control__")
    return m


def retrieval_map(
    meta: pd.DataFrame | AnnData,
    X=None,
    *,
    by: Sequence[str],
    negatives: str = "controls",
    pos_diffby: Sequence[str] = (),
    control: str = "Metadata_pert_type",
    control_value: str = "control",
    null_size: int = 10000,
    threshold: float = 0.05,
    seed: int = 0,
    method: str = "auto",
    block_bytes: int = BLOCK_BYTES,
    show_progress: bool = True,
    return_stats: bool = False,
    n_boot: int = 0,
    n_perm: int | None = None,
    what: str = "mAP",
):
    """Retrieve each treatment's replicates (same `by` values) among negatives.

    negatives = `controls`: against negative controls only (phenotypic activity);
    negatives = `others`: against every profile with a different first `by` column (other
    compounds and the controls). Controls are never queries. `pos_diffby` (e.g. the dose
    column, with by=[compound]) makes positives differ in those columns. Returns the per-profile
    AP table and the per-group mAP table with p-values and FDR. With `return_stats`, the mAP
    table gains each group's chance level and interval and a third element holds the summary
    mAP's stats (chance, `n_boot` bootstrap interval, p-value of `n_perm` label permutations,
    default min(null_size, MAP_PERMUTATIONS); `with_statistics`).
    """
    meta, X = profiles_of(meta, X)
    by = _as_list(by)
    if not by:
        raise ValueError("retrieval needs at least one column in `by` (e.g. the compound)")
    is_ctrl = is_control_row(meta, control, control_value)
    if negatives == "controls" and not is_ctrl.any():
        raise ValueError(
            f"no controls found ({control} == {control_value!r}): phenotypic activity needs "
            "negative-control profiles"
        )
    m = _with_refs(meta, by, is_ctrl)
    if negatives == "controls":
        neg_diffby = [_CTRL]
    elif negatives == "others":
        neg_diffby = [by[0]]
    else:
        raise ValueError(f"negatives must be 'controls' or 'others', got {negatives!r}")
    rules = dict(
        pos_sameby=[*by, _REF],
        pos_diffby=_as_list(pos_diffby),
        neg_sameby=[],
        neg_diffby=neg_diffby,
    )
    ap = average_precision(
        m, X, method=method, block_bytes=block_bytes, show_progress=show_progress, **rules
    )
    ap = ap.drop(columns=[_REF, _CTRL])
    maps = mean_average_precision(
        ap, sameby=by, null_size=null_size, threshold=threshold, seed=seed
    )
    if not return_stats:
        return ap, maps
    return _with_stats(
        ap,
        maps,
        m,
        X,
        rules,
        by,
        n_boot=n_boot,
        n_perm=n_perm,
        null_size=null_size,
        seed=seed,
        what=what,
        block_bytes=block_bytes,
        control=control,
        control_value=control_value,
    )


def moa_map(
    meta: pd.DataFrame | AnnData,
    X=None,
    *,
    moa: str,
    compound: str,
    control: str = "Metadata_pert_type",
    control_value: str = "control",
    null_size: int = 10000,
    threshold: float = 0.05,
    seed: int = 0,
    method: str = "auto",
    block_bytes: int = BLOCK_BYTES,
    show_progress: bool = True,
    return_stats: bool = False,
    n_boot: int = 0,
    n_perm: int | None = None,
    what: str = "mAP",
):
    """MoA retrieval: positives share the MoA but not the compound; negatives differ in MoA.

    Controls are dropped (rows where `control == control_value`, when the column exists).
    Returns the per-profile AP table and the per-MoA mAP table (and, with `return_stats`, the
    stats as `retrieval_map`).
    """
    meta, X = profiles_of(meta, X)
    m, X = drop_controls(meta, X, control=control, control_value=control_value)
    rules = dict(pos_sameby=[moa], pos_diffby=[compound], neg_sameby=[], neg_diffby=[moa])
    ap = average_precision(
        m, X, method=method, block_bytes=block_bytes, show_progress=show_progress, **rules
    )
    maps = mean_average_precision(
        ap, sameby=[moa], null_size=null_size, threshold=threshold, seed=seed
    )
    if not return_stats:
        return ap, maps
    return _with_stats(
        ap,
        maps,
        m,
        X,
        rules,
        [moa],
        n_boot=n_boot,
        n_perm=n_perm,
        null_size=null_size,
        seed=seed,
        what=what,
        block_bytes=block_bytes,
        control=None,
        control_value=control_value,
    )
