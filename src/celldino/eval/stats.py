"""How much a number means: chance levels, permutation nulls, bootstrap intervals, flags.

One implementation that NSC/NSCB, the classifier F1s, mAP (replicate, MoA) and phenotypic
activity all use, so every metrics table carries the same columns beside a value:

- `chance`: the value a metric takes when the features carry no information, computed exactly
  where a closed form exists (NSC: the label frequency among each query's eligible neighbours;
  mAP: copairs' expected AP of a random ranking; F1: the better of the majority-class and the
  stratified-random baseline).
- `ci_low`, `ci_high`: percentile bootstrap 95% interval, resampling the independent unit
  (compounds for NSC, queries within their group for mAP, test samples for F1).
- `p_perm`: permutation p-value with the +1 correction, `(1 + #{null >= observed}) / (1 + N)`,
  labels shuffled within the metric's constraints.
- `n_queries`: how many queries (treatments, profiles, test samples) the value averages.
- `flags`: '; '-joined reasons the value is degenerate (one class, k >= training size, fewer
  than `MIN_QUERIES` queries, most groups dropped as singletons, identical feature sets).

Everything is vectorised over resamples and permutations: no Python loop per permutation over
a big matrix.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from celldino.log import get_logger

logger = get_logger(__name__)

STAT_COLUMNS = ("chance", "ci_low", "ci_high", "p_perm", "n_queries", "flags")
N_BOOT = 1000  # default bootstrap resamples (evaluate.n_boot)
LEVEL = 0.95  # interval coverage
MIN_QUERIES = 10  # fewer queries than this: the value moves in steps of >= 0.1, flagged
_CHUNK = 4_000_000  # cells of a (resamples × items) block built at once


def rng_for(seed: int, name: str) -> np.random.Generator:
    """A generator per (seed, metric name): each metric's stream is fixed by `evaluate.seed`
    and independent of which other metrics ran before it."""
    return np.random.default_rng([int(seed), zlib.crc32(name.encode())])


def empty_stats(n_queries: float = np.nan, flags: Iterable[str] = ()) -> dict:
    """A stats record with no chance, interval or p-value (metrics they do not apply to)."""
    return {
        "chance": np.nan,
        "ci_low": np.nan,
        "ci_high": np.nan,
        "p_perm": np.nan,
        "n_queries": float(n_queries),
        "flags": join_flags(flags),
    }


def join_flags(flags: Iterable[str]) -> str:
    return "; ".join(dict.fromkeys(f for f in flags if f))


def stats_record(
    chance: float,
    boot: np.ndarray | None,
    null: np.ndarray | None,
    observed: float,
    n_queries: int,
    flags: Iterable[str] = (),
) -> dict:
    """The STAT_COLUMNS of one value from its bootstrap replicates and its permutation null."""
    lo, hi = percentile_ci(boot)
    return {
        "chance": float(chance),
        "ci_low": lo,
        "ci_high": hi,
        "p_perm": p_value(observed, null),
        "n_queries": float(n_queries),
        "flags": join_flags(flags),
    }


def few_queries(n: int, what: str = "queries") -> list[str]:
    return [f"only {n} {what} (< {MIN_QUERIES})"] if n < MIN_QUERIES else []


def warn_flags(where: str, flags: Iterable[str]) -> None:
    """Log each degenerate-evaluation reason as a warning (also kept in the `flags` column)."""
    text = join_flags(flags)
    if text:
        logger.warning("%s: degenerate evaluation: %s", where, text)


# ---- p-values and intervals -------------------------------------------------------------------


def p_value(observed: float, null: np.ndarray | None) -> float:
    """One-sided permutation p-value, +1 corrected: (1 + #{null >= observed}) / (1 + N)."""
    if null is None or len(null) == 0 or not np.isfinite(observed):
        return float("nan")
    null = np.asarray(null, dtype=np.float64)
    null = null[np.isfinite(null)]
    # a tolerance so that a null equal to the observed value up to rounding counts as >=
    ge = int((null >= observed - 1e-12 * max(1.0, abs(observed))).sum())
    return (ge + 1) / (len(null) + 1)


def percentile_ci(boot: np.ndarray | None, level: float = LEVEL) -> tuple[float, float]:
    """Percentile-method interval of bootstrap replicates along axis 0 (NaN replicates skipped)."""
    if boot is None or len(boot) == 0:
        return float("nan"), float("nan")
    boot = np.asarray(boot, dtype=np.float64)
    if not np.isfinite(boot).any():
        return float("nan"), float("nan")
    a = (1 - level) / 2
    lo, hi = np.nanquantile(boot, [a, 1 - a], axis=0)
    return float(lo), float(hi)


def bootstrap_counts(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n) how often each of n units is drawn in each resample (multinomial)."""
    if n == 0 or n_boot == 0:
        return np.zeros((n_boot, n), dtype=np.int64)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot)


def cluster_bootstrap_mean(
    values: np.ndarray, clusters: np.ndarray | None, n_boot: int, rng: np.random.Generator
) -> np.ndarray:
    """(n_boot,) means of `values` over resampled clusters (whole clusters drawn with
    replacement; each cluster's items all come along). `clusters` None: items are the units."""
    values = np.asarray(values, dtype=np.float64)
    if clusters is None:
        clusters = np.arange(len(values))
    codes, uniq = pd.factorize(pd.Series(clusters))
    sums = np.bincount(codes, weights=values, minlength=len(uniq))
    counts = np.bincount(codes, minlength=len(uniq)).astype(np.float64)
    W = bootstrap_counts(len(uniq), n_boot, rng).astype(np.float64)  # (B, clusters)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (W @ sums) / (W @ counts)


def stratified_group_means(
    values: np.ndarray, codes: np.ndarray, n_boot: int, rng: np.random.Generator
) -> np.ndarray:
    """(n_boot, groups) bootstrap of per-group means, items resampled within their group (every
    group keeps its size); `codes` (n,) are group numbers 0..G-1, each used."""
    values = np.asarray(values, dtype=np.float64)
    codes = np.asarray(codes)
    order = np.argsort(codes, kind="stable")
    v = values[order]
    g_of = codes[order]
    size = np.bincount(codes)
    start = np.concatenate([[0], np.cumsum(size)[:-1]])
    out = np.empty((n_boot, len(size)))
    step = max(1, _CHUNK // max(1, len(v)))
    for s in range(0, n_boot, step):
        b = min(step, n_boot - s)
        u = rng.random((b, len(v)))
        idx = start[g_of] + np.minimum((u * size[g_of]).astype(np.int64), size[g_of] - 1)
        out[s : s + b] = np.add.reduceat(v[idx], start, axis=1) / size
    return out


# ---- classification ---------------------------------------------------------------------------


def macro_f1_batch(
    y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, weights: np.ndarray | None = None
) -> np.ndarray:
    """Macro-F1 of R label vectors at once, as sklearn's `f1_score(average='macro')`: classes
    present in the truth or the predictions (weight > 0) count, F1 0 where TP is 0.

    `y_true` / `y_pred`: (n,) or (R, n) class codes; `weights`: (R, n) row multiplicities
    (bootstrap counts) or None."""
    y_true, y_pred = np.atleast_2d(y_true), np.atleast_2d(y_pred)
    R = max(len(y_true), len(y_pred), len(weights) if weights is not None else 1)
    n = max(y_true.shape[1], y_pred.shape[1])
    C = n_classes
    out = np.empty(R)
    step = max(1, _CHUNK // max(1, n))
    for s in range(0, R, step):
        e = min(R, s + step)
        yt = np.broadcast_to(y_true if len(y_true) == 1 else y_true[s:e], (e - s, n))
        yp = np.broadcast_to(y_pred if len(y_pred) == 1 else y_pred[s:e], (e - s, n))
        off = (np.arange(e - s) * C * C)[:, None]
        w = None if weights is None else np.asarray(weights[s:e], dtype=np.float64).ravel()
        cm = np.bincount((off + yt * C + yp).ravel(), weights=w, minlength=(e - s) * C * C)
        cm = cm.reshape(e - s, C, C)
        tp = np.diagonal(cm, axis1=1, axis2=2)
        denom = cm.sum(axis=2) + cm.sum(axis=1)  # support + predicted
        present = denom > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = np.where(present, 2 * tp / np.where(present, denom, 1), 0.0)
            out[s:e] = f1.sum(axis=1) / present.sum(axis=1)
    return out


def f1_chance(y_train: np.ndarray, y_test: np.ndarray, n_classes: int) -> dict[str, float]:
    """Macro-F1 of two label-only baselines on this test set and the better of the two.

    majority: always the most frequent training class (exact: F1 = 2q/(1+q) for that class,
    q its test fraction, 0 for the others). stratified: random predictions drawn from the
    training class frequencies p; F1 of the expected confusion matrix, 2pq/(p+q) per class
    (the large-test-set limit of the expected F1). Classes count as sklearn counts them:
    present in the test labels or predicted."""
    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    p = np.bincount(y_train, minlength=n_classes) / max(1, len(y_train))
    q = np.bincount(y_test, minlength=n_classes) / max(1, len(y_test))
    m = int(np.argmax(p))
    present = q > 0
    present_m = present.copy()
    present_m[m] = True
    majority = (2 * q[m] / (1 + q[m])) / present_m.sum()
    both = (p > 0) | present
    with np.errstate(invalid="ignore", divide="ignore"):
        per = np.where(both, 2 * p * q / np.where(both, p + q, 1), 0.0)
    stratified = per.sum() / max(1, both.sum())
    return {
        "majority": float(majority),
        "stratified": float(stratified),
        "chance": float(max(majority, stratified)),
    }


def permutation_units(y: np.ndarray, groups: np.ndarray | None) -> np.ndarray | None:
    """Group codes to permute labels by, when the label is constant within every group (labels
    then move with their group, as the split keeps groups together); None: permute rows."""
    if groups is None:
        return None
    codes = pd.factorize(pd.Series(groups))[0]
    per_group = pd.Series(y).groupby(codes).nunique()
    return codes if (per_group <= 1).all() else None


def permuted_labels(
    y: np.ndarray, units: np.ndarray | None, n_perm: int, rng: np.random.Generator
) -> np.ndarray:
    """(n_perm, n) label vectors shuffled among rows, or among `units` (each unit's rows keep
    one label) when given."""
    y = np.asarray(y)
    if units is None:
        idx = np.tile(np.arange(len(y)), (n_perm, 1))
        return y[rng.permuted(idx, axis=1)]
    n_u = int(units.max()) + 1
    unit_label = np.zeros(n_u, dtype=y.dtype)
    unit_label[units] = y
    idx = rng.permuted(np.tile(np.arange(n_u), (n_perm, 1)), axis=1)  # (N, units)
    return unit_label[idx][:, units]


def f1_statistics(
    y_train: np.ndarray,
    y_test: np.ndarray,
    pred: np.ndarray,
    n_classes: int,
    *,
    groups: np.ndarray | None,
    n_boot: int,
    n_perm: int,
    rng: np.random.Generator,
    flags: Sequence[str] = (),
) -> dict:
    """STAT_COLUMNS of a macro-F1: chance (`f1_chance`), bootstrap of test samples, and a
    null with the test labels shuffled (among test groups when labels are constant within
    them) while the predictions stay fixed."""
    y_test, pred = np.asarray(y_test), np.asarray(pred)
    observed = float(macro_f1_batch(y_test, pred, n_classes)[0]) if len(y_test) else np.nan
    boot = None
    if n_boot and len(y_test):
        boot = macro_f1_batch(y_test, pred, n_classes, bootstrap_counts(len(y_test), n_boot, rng))
    null = None
    if n_perm and len(y_test):
        units = permutation_units(y_test, groups)
        null = np.concatenate(
            [
                macro_f1_batch(permuted_labels(y_test, units, b, rng), pred, n_classes)
                for b in _batches(n_perm, len(y_test))
            ]
        )
    flags = list(flags)
    if len(np.unique(y_test)) < 2:
        flags.append("one class in the test set")
    if len(np.unique(y_train)) < 2:
        flags.append("one class in the training set")
    flags += few_queries(len(y_test), "test samples")
    chance = f1_chance(y_train, y_test, n_classes)["chance"]
    return stats_record(chance, boot, null, observed, len(y_test), flags)


def _batches(total: int, width: int) -> list[int]:
    step = max(1, _CHUNK // max(1, width))
    return [min(step, total - s) for s in range(0, total, step)]


# ---- nearest-neighbour MoA matching (NSC / NSCB) -----------------------------------------------


def nsc_statistics(
    share: np.ndarray,
    allowed: np.ndarray,
    nn: np.ndarray,
    queries: np.ndarray,
    compound: np.ndarray,
    *,
    n_boot: int,
    n_perm: int,
    rng: np.random.Generator,
    flags: Sequence[str] = (),
) -> tuple[dict, np.ndarray]:
    """STAT_COLUMNS of a 1-NN MoA accuracy.

    share (n, n): treatments i and j share a MoA label; allowed (n, n): j may be i's neighbour;
    nn (n,): each treatment's neighbour; queries: the indices scored (those with a neighbour);
    compound (n,): compound of each treatment.
    chance: per query, the fraction of its allowed neighbours that share its MoA (the accuracy
    of a neighbour drawn at random among them), averaged over queries. Bootstrap: compounds
    resampled (a compound's treatments come along). Null: MoA labels shuffled among compounds
    (a compound keeps one MoA over its doses; among treatments if a compound has several),
    neighbours fixed (they do not depend on the labels). Returns (stats, per-query chance)."""
    q = np.asarray(queries, dtype=np.int64)
    n = len(share)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_query = (share & allowed).sum(axis=1)[q] / allowed.sum(axis=1)[q]
    correct = share[q, nn[q]]
    observed = float(np.mean(correct)) if len(q) else np.nan
    chance = float(np.mean(per_query)) if len(q) else np.nan
    cpd = pd.factorize(pd.Series(compound))[0]
    boot = cluster_bootstrap_mean(correct, cpd[q], n_boot, rng) if n_boot and len(q) else None
    null = None
    if n_perm and len(q):
        n_cpd = int(cpd.max()) + 1
        rep = np.zeros(n_cpd, dtype=np.int64)  # first treatment of each compound
        rep[cpd[::-1]] = np.arange(n)[::-1]
        if np.array_equal(share, share[np.ix_(rep[cpd], rep[cpd])]):  # one label set per compound
            share_u, unit, n_u = share[np.ix_(rep, rep)], cpd, n_cpd
        else:
            share_u, unit, n_u = share, np.arange(n), n
        parts = []
        for b in _batches(n_perm, len(q)):
            perm = permuted_labels(np.arange(n_u), None, b, rng)  # (b, units)
            parts.append(share_u[perm[:, unit[q]], perm[:, unit[nn[q]]]].mean(axis=1))
        null = np.concatenate(parts)
    flags = list(flags)
    if len(q) and np.all(per_query >= 1):
        flags.append("every allowed neighbour shares the MoA (one MoA)")
    flags += few_queries(len(q), "treatments")
    return stats_record(chance, boot, null, observed, len(q), flags), per_query


# ---- mAP ----------------------------------------------------------------------------------------


def expected_ap(num_pos: np.ndarray, total: np.ndarray) -> np.ndarray:
    """Expected AP under a random ranking (copairs.map.normalization.expected_ap, vectorised)."""
    M = np.asarray(num_pos, dtype=np.int64)
    L = np.asarray(total, dtype=np.int64)
    if len(L) == 0:
        return np.zeros(0)
    harmonic = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, max(int(L.max()), 1) + 1))])
    H = harmonic[L]
    with np.errstate(divide="ignore", invalid="ignore"):
        mu0 = (1.0 / L) * (((M - 1.0) / (L - 1.0)) * (L - H) + H)
    mu0 = np.where(L == 1, (M == 1).astype(float), mu0)
    mu0 = np.where(M == 0, 0.0, mu0)
    return np.where((M == L) & (L > 1), 1.0, mu0)


def map_statistics(
    ap: pd.DataFrame,
    sameby: Sequence[str],
    *,
    null: np.ndarray | None,
    n_boot: int,
    rng: np.random.Generator,
    what: str = "mAP",
) -> tuple[dict, pd.DataFrame]:
    """STAT_COLUMNS of an mAP (mean over groups of the mean AP of their queries) and the
    per-group chance and interval.

    chance: the expected AP of each query under a random ranking of its candidates (copairs'
    `expected_ap`, close to the query's positive fraction), averaged as the mAP is.
    Bootstrap: queries resampled within their group. `null`: the summary mAP under label
    permutations (`celldino.eval.map.permuted_map_null`), or None (no p_perm).
    Groups whose queries have no positive pair (singletons) are counted and flagged when they
    outnumber the groups kept. Returns (stats, per-group table: sameby, chance, ci_low, ci_high).
    """
    sameby = list(sameby)
    all_groups = ap.groupby(sameby, observed=True, dropna=False).ngroups if len(ap) else 0
    scores = ap[ap["average_precision"].notna() & (ap["n_pos_pairs"] > 0)].reset_index(drop=True)
    keys = list(scores[sameby].itertuples(index=False, name=None))
    n_q = len(scores)
    flags: list[str] = []
    per_group = pd.DataFrame(columns=[*sameby, "chance", "ci_low", "ci_high"])
    if n_q == 0:
        return empty_stats(0, ["no query has a positive pair"]), per_group
    num_pos = scores["n_pos_pairs"].to_numpy(np.int64)
    total = scores["n_total_pairs"].to_numpy(np.int64)
    values = scores["average_precision"].to_numpy(np.float64)
    codes, uniq = pd.factorize(pd.Series(keys))
    G = len(uniq)
    size = np.bincount(codes, minlength=G).astype(np.float64)
    e_ap = expected_ap(num_pos, total)
    g_chance = np.bincount(codes, weights=e_ap, minlength=G) / size
    observed = float(np.mean(np.bincount(codes, weights=values, minlength=G) / size))
    boot, g_lo, g_hi = None, np.full(G, np.nan), np.full(G, np.nan)
    if n_boot:
        gm = stratified_group_means(values, codes, n_boot, rng)  # (B, G)
        boot = gm.mean(axis=1)
        a = (1 - LEVEL) / 2
        g_lo, g_hi = np.quantile(gm, [a, 1 - a], axis=0)
    dropped = all_groups - G
    if dropped:
        logger.warning(
            "%s: %d of %d groups (%s) have no replicate pair (singletons) and are left out; "
            "the mAP averages the %d left",
            what,
            dropped,
            all_groups,
            "+".join(sameby),
            G,
        )
        if dropped >= G:
            flags.append(f"{dropped} of {all_groups} groups dropped as singletons ({G} kept)")
    if G < 2:
        flags.append(f"only {G} group")
    flags += few_queries(n_q)
    per_group = pd.DataFrame(list(uniq), columns=sameby)
    per_group["chance"], per_group["ci_low"], per_group["ci_high"] = g_chance, g_lo, g_hi
    stats = stats_record(float(np.mean(g_chance)), boot, null, observed, n_q, flags)
    return stats, per_group


# ---- across feature sets ----------------------------------------------------------------------


def flag_identical_sets(
    tidy: pd.DataFrame, same_profiles: set[frozenset[str]] | None = None
) -> pd.DataFrame:
    """Flag two feature sets that score identically on every scored metric (a row with a chance
    level) of an analysis: usually the same data under two names, or features that were ignored.
    Returns the table with the reason added to `flags` (and logged).

    `same_profiles` (the runner's pairs of sets whose profiles are equal): when given, only
    those pairs are flagged; a tie between sets whose profiles differ (an NSC over 12 queries
    takes 13 values) is logged at INFO as a tie, not as the same data."""
    if "chance" not in tidy.columns or tidy["feature_set"].nunique() < 2:
        return tidy
    tidy = tidy.copy()
    tidy["flags"] = tidy["flags"].fillna("").astype(str)
    scored = tidy[tidy["chance"].notna()]
    for analysis, part in scored.groupby("analysis", sort=False):
        wide = part.pivot_table(index="metric", columns="feature_set", values="value", dropna=False)
        sets = list(wide.columns)
        for i, a in enumerate(sets):
            for b in sets[i + 1 :]:
                va, vb = wide[a].to_numpy(), wide[b].to_numpy()
                ok = np.isfinite(va) & np.isfinite(vb)
                if ok.any() and np.array_equal(va[ok], vb[ok]) and ok.sum() == len(va):
                    if same_profiles is not None and frozenset((a, b)) not in same_profiles:
                        logger.info(
                            "%s: feature sets '%s' and '%s' tie on %s though their profiles "
                            "differ: these data do not tell them apart on this analysis",
                            analysis,
                            a,
                            b,
                            ", ".join(map(str, wide.index)),
                        )
                        continue
                    for me, other in ((a, b), (b, a)):
                        reason = f"scores identical to feature set '{other}'"
                        rows = (
                            (tidy["analysis"] == analysis)
                            & (tidy["feature_set"] == me)
                            & tidy["chance"].notna()
                        )
                        tidy.loc[rows, "flags"] = [
                            join_flags([*f.split("; "), reason]) for f in tidy.loc[rows, "flags"]
                        ]
                    logger.warning(
                        "%s: feature sets '%s' and '%s' score identically on every scored "
                        "metric (%s)%s; check that they differ",
                        analysis,
                        a,
                        b,
                        ", ".join(map(str, wide.index)),
                        "" if same_profiles is None else ": their profiles are equal",
                    )
    return tidy


def stat_columns(stats: dict | None) -> dict:
    """The STAT_COLUMNS of one metric's stats record (NaN and '' where absent)."""
    rec = empty_stats()
    rec.update({k: v for k, v in (stats or {}).items() if k in STAT_COLUMNS})
    rec["flags"] = rec["flags"] or ""
    return rec


def metrics_table(
    rows: list[dict], same_profiles: set[frozenset[str]] | None = None
) -> tuple[pd.DataFrame, dict[str, dict[str, str]]]:
    """The runner's tidy table (feature_set, analysis, metric, value, *STAT_COLUMNS) from its
    rows, with identical feature sets flagged (`flag_identical_sets`); and the flags by
    'analysis on feature set' → metric → reasons, for summary.json."""
    cols = ["feature_set", "analysis", "metric", "value", *STAT_COLUMNS]
    tidy = pd.DataFrame([{**stat_columns(None), **r} for r in rows], columns=cols)
    tidy = flag_identical_sets(tidy, same_profiles)
    flagged: dict[str, dict[str, str]] = {}
    for r in tidy[tidy["flags"].astype(str) != ""].itertuples(index=False):
        flagged.setdefault(f"{r.analysis} on {r.feature_set}", {})[r.metric] = r.flags
    return tidy, flagged
