"""Every analysis `celldino evaluate` can run, and the registry `ANALYSES` that names them.

Each `run_*` adapter has the runner's signature `fn(meta, X, ctx, **params)`: it reads column
roles from `ctx.cols` (compound, moa, plate, well, control…), takes the spec's parameters, calls
the public function and returns the numbers for the metrics table plus the detail tables
(`AnalysisResult`). Analyses that compare feature sets (mantel, cca, block_search) find the
others in `ctx.sets`; those that read a `celldino run` folder (attention_iou,
discriminative_patches: attention.zarr and the crops) find it from the feature set's profiles
path and are skipped, with the reason, when there is none. Each reports its baseline beside it
(permutation null, broken pairs, shuffled labels or cells). Adding one: write `run_<name>` here
and register it in `ANALYSES` with one line.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from celldino.eval.activity import NEGATIVES, phenotypic_activity
from celldino.eval.classify import MLPOptions, classify
from celldino.eval.enrichment import enrichment
from celldino.eval.factors import factor_mutual_information
from celldino.eval.heterogeneity import heterogeneity
from celldino.eval.lowshot import lowshot_curve
from celldino.eval.map import moa_map, retrieval_map, summarize
from celldino.eval.moa import moa_prediction
from celldino.eval.multitask import multitask_activity
from celldino.eval.nsc import nsc_nscb, treatment_profiles
from celldino.eval.similarity import group_similarity
from celldino.eval.spec import (
    AnalysisResult,
    EvalContext,
    NotEvaluable,
    SpecError,
    is_control_row,
)
from celldino.eval.stats import STAT_COLUMNS, empty_stats
from celldino.log import get_logger

logger = get_logger(__name__)


# ---- retrieval and matching ------------------------------------------------------------------


def _whole(value: Any) -> int:
    """A count written in the spec: 100, 1.0e+3 or '100'; not yes/no (YAML booleans, which
    int() reads as 1/0) nor 1.5 (which int() cuts to 1)."""
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"{value!r} is not a whole number")
    return int(value)


def map_kwargs(ctx: EvalContext, params: dict) -> dict:
    try:
        null_size = _whole(params.get("null_size", ctx.null_size))
        threshold = params.get("threshold", ctx.threshold)
        if isinstance(threshold, bool):
            raise ValueError(f"threshold {threshold!r} is not a number")
        threshold = float(threshold)
    except (TypeError, ValueError) as e:
        raise SpecError(f"analysis parameters null_size / threshold must be numbers: {e}") from None
    if null_size < 1 or not 0 < threshold <= 1:
        raise SpecError(
            f"analysis parameters: null_size must be >= 1 (got {null_size}) and threshold in "
            f"(0, 1] (got {threshold}); fix them in the spec's analyses"
        )
    return {
        "null_size": null_size,
        "threshold": threshold,
        "seed": ctx.seed,
        "method": params.get("method", ctx.map_method),
        "block_bytes": ctx.block_bytes,
        "control": ctx.cols.control,
        "control_value": ctx.cols.control_value,
    }


def _with_moa(
    meta: pd.DataFrame, X: np.ndarray, ctx: EvalContext, analysis: str
) -> tuple[pd.DataFrame, np.ndarray]:
    """Drop treatment rows without a MoA annotation (controls are dropped by the analyses)."""
    moa = ctx.cols.require(meta, "moa", analysis)
    missing = meta[moa].isna().to_numpy()
    if ctx.cols.control in meta.columns:  # controls may lack a MoA: give them one
        ctrl = is_control_row(meta, ctx.cols.control, ctx.cols.control_value)
        meta = meta.assign(**{moa: meta[moa].astype(object).where(~(missing & ctrl), "control")})
        missing = missing & ~ctrl  # not in place: under pandas copy-on-write the array is read-only
    if ctx.cols.control in meta.columns:
        treated = ~ctrl
    else:
        treated = np.ones(len(meta), dtype=bool)
    if treated.any() and missing[treated].all():
        raise NotEvaluable(
            f"the MoA column '{moa}' is empty (NaN) for all {int(treated.sum())} treatment "
            "profiles; fill it, or set columns.moa in the spec to the column holding the MoA"
        )
    if missing.any():
        logger.info("%s: %d rows without %s are left out", analysis, int(missing.sum()), moa)
        meta, X = meta[~missing].reset_index(drop=True), np.asarray(X)[~missing]
    return meta, X


def run_nsc(meta: pd.DataFrame, X: np.ndarray, ctx: EvalContext, **params) -> AnalysisResult:
    """NSC and NSCB (when the batch column exists) on treatment profiles."""
    c = ctx.cols
    meta, X = _with_moa(meta, X, ctx, "nsc")
    treatment = params.get("treatment")
    if treatment is None:
        treatment = [c.require(meta, "compound", "nsc")] + (
            [c.dose] if c.present(meta, "dose") else []
        )
    use_batch = params.get("batch", True)
    metrics, table, stats = nsc_nscb(
        meta,
        X,
        moa=c.require(meta, "moa", "nsc"),
        compound=c.require(meta, "compound", "nsc"),
        treatment=treatment or None,
        batch=c.present(meta, "batch") if use_batch else None,
        control=c.control,
        control_value=c.control_value,
        aggregate=params.get("aggregate", "median"),
        moa_sep=c.moa_sep,
        n_boot=ctx.n_boot,
        null_size=ctx.null_size,
        seed=ctx.seed,
        return_stats=True,
    )
    if not metrics["NSC_n"]:
        comp = c.require(meta, "compound", "nsc")
        raise NotEvaluable(
            "no treatment has a nearest neighbour from another compound: NSC needs treatment "
            f"profiles of at least 2 compounds with a MoA ({comp} has "
            f"{meta[comp].nunique()} value(s))"
        )
    return AnalysisResult(metrics, {"neighbours": table}, stats=stats)


def run_map_replicate(
    meta: pd.DataFrame, X: np.ndarray, ctx: EvalContext, **params
) -> AnalysisResult:
    """Replicate retrieval: same compound (and dose) vs other compounds and controls."""
    c = ctx.cols
    by = params.get("by") or [c.require(meta, "compound", "map_replicate")] + (
        [c.dose] if c.present(meta, "dose") else []
    )
    kw = map_kwargs(ctx, params)
    _, maps, st = retrieval_map(
        meta,
        X,
        by=by,
        negatives=params.get("negatives", "others"),
        pos_diffby=params.get("pos_diffby", ()),
        **kw,
        **_stats_kw(ctx, "map_replicate", params),
    )  # the spec's threshold, as the mAP table used it
    return AnalysisResult(
        summarize(maps, kw["threshold"]), {"map": maps.drop(columns="indices")}, stats={"mAP": st}
    )


def _stats_kw(ctx: EvalContext, name: str, params: dict) -> dict:
    """The chance/interval/p-value settings of an mAP analysis (map.retrieval_map); the spec's
    `permutations` sets the label permutations of the summary mAP's p_perm (default 200)."""
    what = f"{name} on {ctx.feature_set}" if ctx.feature_set else name
    perms = params.get("permutations")
    try:
        perms = None if perms is None else _whole(perms)
    except (TypeError, ValueError):
        perms = -1
    if perms is not None and perms < 0:
        raise SpecError(
            f"analyses.{name}.permutations must be a whole number >= 0, got "
            f"{params.get('permutations')!r}"
        )
    return {"return_stats": True, "n_boot": ctx.n_boot, "n_perm": perms, "what": what}


def run_map_moa(meta: pd.DataFrame, X: np.ndarray, ctx: EvalContext, **params) -> AnalysisResult:
    """MoA retrieval: same MoA, other compound, against other MoAs."""
    c = ctx.cols
    meta, X = _with_moa(meta, X, ctx, "map_moa")
    kw = map_kwargs(ctx, params)
    _, maps, st = moa_map(
        meta,
        X,
        moa=c.require(meta, "moa", "map_moa"),
        compound=c.require(meta, "compound", "map_moa"),
        **kw,
        **_stats_kw(ctx, "map_moa", params),
    )
    return AnalysisResult(
        summarize(maps, kw["threshold"]), {"map": maps.drop(columns="indices")}, stats={"mAP": st}
    )


def run_activity(meta: pd.DataFrame, X: np.ndarray, ctx: EvalContext, **params) -> AnalysisResult:
    """Phenotypic activity: each compound (all doses, or `by`) against the controls that no
    profile step was fitted on (`negatives: held_out`, from evaluate.activity_negatives) or
    all of them (`negatives: all`, flagged in-sample); see eval/activity.py."""
    by = params.get("by") or [ctx.cols.require(meta, "compound", "activity")]
    kw = map_kwargs(ctx, params) | _stats_kw(ctx, "activity", params)
    negatives = params.get("negatives", "held_out")
    _, maps, summary, st = phenotypic_activity(meta, X, by=by, negatives=negatives, **kw)
    stats = {"mAP": st}
    if st.get("flags"):  # in-sample or unknown negatives: said beside the count of actives too
        stats["fraction_retrieved"] = empty_stats(summary["n_groups"], [st["flags"]])
    return AnalysisResult(summary, {"map": maps.drop(columns="indices")}, stats=stats)


def activity_defaults(analyses: dict[str, dict], negatives: str) -> dict[str, dict]:
    """The spec's analyses with activity's `negatives` taken from evaluate.activity_negatives
    where the spec does not set it (so the run's summary.json and fingerprints name it)."""
    if "activity" in analyses:
        params = analyses["activity"]
        params.setdefault("negatives", negatives)
        if params["negatives"] not in NEGATIVES:
            raise SpecError(
                f"analyses.activity.negatives={params['negatives']!r}: choose held_out (the "
                "controls no profile step was fitted on) or all (every control, flagged in-sample)"
            )
    return analyses


run_activity.needs_controls = True  # scored against the negative controls


def run_enrichment(meta: pd.DataFrame, X: np.ndarray, ctx: EvalContext, **params) -> AnalysisResult:
    """Folds of enrichment of same-MoA pairs among the most similar treatment pairs."""
    c = ctx.cols
    meta, X = _with_moa(meta, X, ctx, "enrichment")
    compound = c.require(meta, "compound", "enrichment")
    treatment = params.get("treatment")
    if treatment is None:
        treatment = [compound] + ([c.dose] if c.present(meta, "dose") else [])
    m = meta
    if treatment:
        keys = list(dict.fromkeys([*treatment, c.require(meta, "moa", "enrichment")]))
        m, X = treatment_profiles(*c.drop_controls(meta, X), by=keys)
    table = enrichment(
        m,
        X,
        moa=c.require(meta, "moa", "enrichment"),
        compound=compound,
        percentiles=tuple(params.get("percentiles", (1.0, 5.0))),
        control=c.control,
        control_value=c.control_value,
        moa_sep=c.moa_sep,
    )
    metrics = {}
    for _, row in table.iterrows():
        pct = f"{row.percentile:g}"
        metrics[f"odds_ratio_top{pct}pct"] = float(row.odds_ratio)
        metrics[f"p_value_top{pct}pct"] = float(row.p_value)
    return AnalysisResult(metrics, {"enrichment": table})


# ---- classification and biology -------------------------------------------------------------


def _result(metrics: dict, tables: dict[str, pd.DataFrame]) -> AnalysisResult:
    numeric = {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
    }
    return AnalysisResult(numeric, tables)


def _label_and_split(meta: pd.DataFrame, ctx: EvalContext, params: dict, name: str):
    c = ctx.cols
    label = params.get("label") or c.require(meta, "moa", name)
    split_by = params.get("split_by") or c.require(meta, "compound", name)
    if label not in meta.columns:
        raise SpecError(f"analysis '{name}': label column '{label}' not in the profiles")
    return label, split_by


def mlp_options(params: dict, name: str = "classify") -> MLPOptions:
    """The `mlp:` options of an analysis as MLPOptions; an unknown option is a SpecError."""
    fields = MLPOptions.__dataclass_fields__
    raw = params.get("mlp") or {}
    if not isinstance(raw, dict):
        raise SpecError(f"analyses.{name}.mlp: expected a mapping of {sorted(fields)}")
    bad = [k for k in raw if k not in fields]
    if bad:
        raise SpecError(
            f"analyses.{name}.mlp: unknown option(s) {bad}; valid options: "
            f"{', '.join(sorted(fields))}"
        )
    opts = dict(raw)
    if "hidden" in opts:
        opts["hidden"] = tuple(opts["hidden"])
    return MLPOptions(**opts)


def run_classify(meta, X, ctx: EvalContext, **params: Any) -> AnalysisResult:
    """kNN (k = 1…50), linear probe and MLP macro-F1 on a group split (default by compound)."""
    if params.get("exclude_controls", True):
        meta, X = ctx.cols.drop_controls(meta, X)
    label, split_by = _label_and_split(meta, ctx, params, "classify")
    table = classify(
        meta,
        X,
        label=label,
        split_by=split_by,
        classifiers=tuple(params.get("classifiers", ("knn", "linear", "mlp"))),
        ks=tuple(params.get("ks", (1, 5, 10, 20, 50))),
        test_size=float(params.get("test_size", 0.25)),
        mlp_options=mlp_options(params),
        seed=ctx.seed,
        n_boot=ctx.n_boot,
        n_perm=ctx.null_size,
    )
    metrics, stats = {}, {}
    for _, r in table.iterrows():
        key = f"knn_k{int(r.k)}" if r.classifier == "knn" else r.classifier
        metrics[f"{key}_macro_f1"] = r.macro_f1
        stats[f"{key}_macro_f1"] = {c: r[c] for c in STAT_COLUMNS}
    res = _result(metrics, {"classify": table})
    res.stats = stats
    return res


def run_lowshot(meta, X, ctx: EvalContext, **params: Any) -> AnalysisResult:
    """Low-shot curve: classifiers retrained on 1 %…100 % of the training rows."""
    if params.get("exclude_controls", True):
        meta, X = ctx.cols.drop_controls(meta, X)
    label, split_by = _label_and_split(meta, ctx, params, "lowshot")
    table = lowshot_curve(
        meta,
        X,
        label=label,
        split_by=split_by,
        fractions=tuple(params.get("fractions", (0.01, 0.02, 0.05, 0.1, 0.25, 1.0))),
        classifiers=tuple(params.get("classifiers", ("knn", "linear"))),
        ks=tuple(params.get("ks", (5,))),
        n_repeats=int(params.get("n_repeats", 1)),
        mlp_options=mlp_options(params),
        seed=ctx.seed,
    )
    mean = table.groupby(["fraction", "classifier", "k"], dropna=False).macro_f1.mean()
    metrics = {}
    for (frac, clf, k), v in mean.items():
        key = f"knn_k{int(k)}" if clf == "knn" else clf
        metrics[f"{key}_macro_f1_at_{frac:g}"] = v
    return _result(metrics, {"lowshot": table})


def run_moa_prediction(meta, X, ctx: EvalContext, **params: Any) -> AnalysisResult:
    """Multi-label MoA prediction, leave-compound-out, micro PR-AUC; controls excluded."""
    c = ctx.cols
    per_moa, predictions, summary = moa_prediction(
        meta,
        X,
        moa=c.require(meta, "moa", "moa_prediction"),
        compound=c.require(meta, "compound", "moa_prediction"),
        control=c.control if c.control in meta.columns else None,
        control_value=c.control_value,
        moa_sep=c.moa_sep or "|",
        classifier=params.get("classifier", "linear"),
        n_folds=params.get("n_folds", 5),
        min_compounds=int(params.get("min_compounds", 2)),
        mlp_options=mlp_options(params),
        seed=ctx.seed,
    )
    return _result(summary, {"per_moa": per_moa, "predictions": predictions})


def run_multitask(meta, X, ctx: EvalContext, **params: Any) -> AnalysisResult:
    """Multi-task activity prediction (masked BCE) from `tasks` or `task_prefix` columns."""
    tasks = list(params.get("tasks") or [])
    prefix = params.get("task_prefix")
    if prefix:
        tasks += [col for col in meta.columns if str(col).startswith(prefix)]
    if not tasks:
        raise SpecError("analysis 'multitask' needs tasks: [...] or task_prefix: 'Metadata_assay_'")
    table, summary = multitask_activity(
        meta,
        X,
        tasks=tasks,
        split_by=params.get("split_by") or ctx.cols.require(meta, "compound", "multitask"),
        test_size=float(params.get("test_size", 0.25)),
        epochs=int(params.get("epochs", 50)),
        threshold=float(params.get("threshold", 0.9)),
        seed=ctx.seed,
    )
    return _result(summary, {"tasks": table})


def run_factors(meta, X, ctx: EvalContext, **params: Any) -> AnalysisResult:
    """Mutual information of each feature with each factor; fraction of features per factor."""
    c = ctx.cols
    factors = params.get("factors") or [
        col for role in ("moa", "plate", "batch") if (col := c.present(meta, role))
    ]  # not compound or well by default: nested in MoA / unique per profile, they win trivially
    table, summary = factor_mutual_information(
        meta,
        X,
        factors=factors,
        n_bins=int(params.get("n_bins", 10)),
        normalize=params.get("normalize", "none"),
    )
    metrics = {f"fraction_top_{r.factor}": r.fraction_top for r in summary.itertuples()}
    metrics.update({f"mean_mi_{r.factor}": r.mean_mi for r in summary.itertuples()})
    return _result(metrics, {"mutual_information": table, "factors": summary})


def run_similarity(meta, X, ctx: EvalContext, **params: Any) -> AnalysisResult:
    """Group-mean similarity matrix in hierarchical order (long table: group_a, group_b, sim)."""
    if params.get("exclude_controls", True):
        meta, X = ctx.cols.drop_controls(meta, X)
    group = params.get("group") or ctx.cols.require(meta, "moa", "similarity")
    sim = group_similarity(meta, X, group=group, metric=params.get("metric", "cosine"))
    long = sim.stack().rename("similarity").reset_index()
    long.columns = ["group_a", "group_b", "similarity"]
    long["order_a"] = long.group_a.map({g: i for i, g in enumerate(sim.index)})
    long["order_b"] = long.group_b.map({g: i for i, g in enumerate(sim.index)})
    off = sim.to_numpy()[~np.eye(len(sim), dtype=bool)]
    metrics = {"n_groups": len(sim), "mean_offdiagonal_similarity": off.mean() if off.size else 0}
    return _result(metrics, {"similarity": long})


def run_heterogeneity(meta, X, ctx: EvalContext, **params: Any) -> AnalysisResult:
    """Per-field std of single-cell features, max per treatment, precision@k vs annotation."""
    c = ctx.cols
    fields = params.get("fields") or [
        col for col in (c.plate, c.well, "Metadata_Site") if col in meta.columns
    ]
    treatment = params.get("treatment") or c.require(meta, "compound", "heterogeneity")
    exclude = params.get("exclude")
    if exclude is None and c.control in meta.columns:
        is_ctl = is_control_row(meta, c.control, c.control_value)
        exclude = meta.loc[is_ctl, treatment].astype(str).unique().tolist()
    ranked, summary = heterogeneity(
        meta,
        X,
        fields=fields,
        treatment=treatment,
        annotated=params.get("annotated"),
        annotation=params.get("annotation"),
        exclude=exclude or (),
        ks=tuple(params.get("ks", (5, 10))),
        min_cells=int(params.get("min_cells", 3)),
    )
    return _result(summary, {"treatments": ranked})


def run_pseudotime(meta, X, ctx: EvalContext, **params: Any) -> AnalysisResult:
    """Diffusion pseudotime (scanpy) from a root group (`root_by`, `root_value`)."""
    from celldino.eval.pseudotime import diffusion_pseudotime

    out, summary = diffusion_pseudotime(
        meta,
        X,
        root=params.get("root"),
        root_by=params.get("root_by"),
        root_value=params.get("root_value"),
        n_neighbors=int(params.get("n_neighbors", 15)),
        n_pcs=int(params.get("n_pcs", 0)),
        n_dcs=int(params.get("n_dcs", 10)),
        seed=ctx.seed,
    )
    return _result(summary, {"pseudotime": out})


# ---- between feature sets, from the run folder, batch effect -------------------------------


def _baseline(chance: float, n: float, what: str = "queries", p: float = np.nan) -> dict:
    """The stats record of a value whose baseline is measured (a null or a shuffled run): it
    goes in the `chance` column; fewer than MIN_QUERIES units are flagged."""
    from celldino.eval.stats import empty_stats, few_queries

    flags = few_queries(int(n), what) if n == n else []  # n is NaN when unknown
    rec = empty_stats(n, flags)
    rec.update(chance=float(chance), p_perm=float(p))
    return rec


def _reference(ctx: EvalContext, params: dict, name: str):
    """The feature set `name` compares with: `params['other']`, else 'engineered', else the first
    set of the evaluation. On the reference itself the analysis is NotEvaluable."""
    other = params.get("other")
    if other is None:
        other = "engineered" if "engineered" in ctx.sets else next(iter(ctx.sets), None)
    if other is None or (other == ctx.feature_set and len(ctx.sets) < 2):
        raise NotEvaluable(
            f"{name} compares two feature sets and this evaluation has one; list another under "
            f"the spec's inputs (e.g. engineered) or set analyses.{name}.other"
        )
    if other not in ctx.sets:
        raise SpecError(
            f"analyses.{name}.other: no feature set '{other}' (feature sets: {', '.join(ctx.sets)})"
        )
    if other == ctx.feature_set:
        raise NotEvaluable(f"'{other}' is the reference set that {name} compares the others with")
    return other, ctx.sets[other]


def _aligned(meta: pd.DataFrame, X, ref, ctx: EvalContext, keys, name: str):
    """Rows of this set and of the reference set that describe the same profile, matched by
    `keys` (default: plate and well): (meta, X, X_ref), in this set's order."""
    keys = list(keys or [])
    if not keys:
        keys = [
            col
            for col in (ctx.cols.plate, ctx.cols.well)
            if col in meta.columns and col in ref.meta.columns
        ]
    missing = [k for k in keys if k not in meta.columns or k not in ref.meta.columns]
    if not keys or missing:
        raise NotEvaluable(
            f"{name}: cannot match the rows of '{ctx.feature_set}' with the reference set: "
            f"key column(s) {missing or [ctx.cols.plate, ctx.cols.well]} missing in one of them;"
            f" set analyses.{name}.keys to columns both have"
        )
    a = meta[keys].astype(str).reset_index(drop=True)
    b = ref.meta[keys].astype(str).reset_index(drop=True)
    for which, t in (("this set", a), ("the reference set", b)):
        if t.duplicated().any():
            raise NotEvaluable(
                f"{name}: rows of {which} are not unique by {keys} (single cells?); compare "
                f"profiles with one row per {' + '.join(keys)}, or set analyses.{name}.keys"
            )
    m = a.assign(_i=np.arange(len(a))).merge(b.assign(_j=np.arange(len(b))), on=keys)
    if len(m) < len(a) or len(m) < len(b):
        logger.info(
            "%s: %d of %d / %d rows matched by %s", name, len(m), len(a), len(b), "+".join(keys)
        )
    i, j = m["_i"].to_numpy(), m["_j"].to_numpy()
    return meta.iloc[i].reset_index(drop=True), np.asarray(X)[i], np.asarray(ref.X)[j]


def _treatment_keys(meta: pd.DataFrame, ctx: EvalContext, params: dict, name: str) -> list[str]:
    by = params.get("by")
    if by:
        return [by] if isinstance(by, str) else list(by)
    c = ctx.cols
    return [c.require(meta, "compound", name)] + ([c.dose] if c.present(meta, "dose") else [])


def _group_means(X: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    names, inv = np.unique(groups, return_inverse=True)
    means = np.zeros((len(names), X.shape[1]))
    np.add.at(means, inv, X)
    return names, means / np.bincount(inv)[:, None]


def _cosine_distances(M: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(M, axis=1, keepdims=True)
    U = M / np.where(n == 0, 1.0, n)
    D = 1.0 - np.clip(U @ U.T, -1.0, 1.0)
    np.fill_diagonal(D, 0.0)
    return D


def run_mantel(meta, X, ctx: EvalContext, **params: Any) -> AnalysisResult:
    """Mantel test: do two feature sets put the treatments at the same cosine distances?"""
    from celldino.eval.similarity import mantel_test

    other, ref = _reference(ctx, params, "mantel")
    meta, A, B = _aligned(meta, X, ref, ctx, params.get("keys"), "mantel")
    if params.get("exclude_controls", True):
        keep = np.ones(len(meta), dtype=bool)
        if ctx.cols.control in meta.columns:
            keep = ~is_control_row(meta, ctx.cols.control, ctx.cols.control_value)
        meta, A, B = meta[keep].reset_index(drop=True), A[keep], B[keep]
    by = _treatment_keys(meta, ctx, params, "mantel")
    groups = meta[by].astype(str).agg(" | ".join, axis=1).to_numpy()
    names, Ma = _group_means(A, groups)
    _, Mb = _group_means(B, groups)
    if len(names) < 3:
        raise NotEvaluable(
            f"the Mantel test needs 3 or more treatments ({'+'.join(by)}), got {len(names)}"
        )
    res = mantel_test(
        _cosine_distances(Ma),
        _cosine_distances(Mb),
        method=params.get("method", "spearman"),
        n_permutations=int(params.get("n_permutations", 999)),
        seed=ctx.seed,
    )
    table = pd.DataFrame([{"reference": other, "by": "+".join(by), **res}])
    metrics = {k: res[k] for k in ("r", "p_value", "null_mean", "null_q95", "n_objects")}
    out = _result(metrics, {"mantel": table})
    out.stats = {"r": _baseline(res["null_mean"], len(names), "treatments", p=res["p_value"])}
    return out


run_mantel.reads_sets = True


def run_cca(meta, X, ctx: EvalContext, **params: Any) -> AnalysisResult:
    """CCA between this set and a reference set: held-out profiles matched to their partner."""
    from sklearn.decomposition import PCA

    from celldino.eval.similarity import cca_matching

    other, ref = _reference(ctx, params, "cca")
    meta, A, B = _aligned(meta, X, ref, ctx, params.get("keys"), "cca")
    if len(meta) < 8:
        raise NotEvaluable(f"CCA matching needs 8 or more matched profiles, got {len(meta)}")
    n_pcs = int(params.get("n_pcs", 20))
    if n_pcs:  # each set on its own (no pairing used): CCA on p >> n features is ill-posed
        k = max(1, min(n_pcs, len(meta) // 2))
        A = PCA(min(k, A.shape[1]), random_state=ctx.seed).fit_transform(A)
        B = PCA(min(k, B.shape[1]), random_state=ctx.seed).fit_transform(B)
    kw = dict(
        n_components=int(params.get("n_components", 2)),
        split_by=params.get("split_by") or ctx.cols.require(meta, "compound", "cca"),
        test_size=float(params.get("test_size", 0.25)),
        seed=ctx.seed,
    )
    res = cca_matching(meta, A, B, **kw)
    # baseline: the same fit with the pairs broken (row i of B is another profile's)
    perm = np.random.default_rng(ctx.seed).permutation(len(B))
    null = cca_matching(meta, A, B[perm], **kw)
    metrics = {
        "accuracy_a_to_b": res["accuracy_a_to_b"],
        "accuracy_b_to_a": res["accuracy_b_to_a"],
        "permuted_accuracy_a_to_b": null["accuracy_a_to_b"],
        "permuted_accuracy_b_to_a": null["accuracy_b_to_a"],
        "chance": res["chance"],
        "canonical_correlation_1": res["test_canonical_correlations"][0],
        "n_test": res["n_test"],
    }
    row = {k: v for k, v in res.items() if k != "test_canonical_correlations"}
    table = pd.DataFrame(
        [
            {
                "reference": other,
                **row,
                **{f"permuted_{k}": null[k] for k in ("accuracy_a_to_b", "accuracy_b_to_a")},
            }
        ]
    )
    out = _result(metrics, {"cca": table})
    for k in ("accuracy_a_to_b", "accuracy_b_to_a"):
        out.stats[k] = _baseline(res["chance"], res["n_test"], "test profiles")
    return out


run_cca.reads_sets = True


def run_block_search(meta, X, ctx: EvalContext, **params: Any) -> AnalysisResult:
    """kNN / linear MoA F1 of each transformer block's features; the best block per set."""
    from celldino.eval.classify import block_search

    names = params.get("blocks")
    if names is None:
        pat = re.compile(rf"{re.escape(ctx.feature_set)}_block(-?\d+)")
        found = [(int(m.group(1)), n) for n in ctx.sets if (m := pat.fullmatch(n))]
        names = [n for _, n in sorted(found)]
    if not names:
        raise NotEvaluable(
            f"no per-block feature sets of '{ctx.feature_set}': extract each block "
            "(extract.feature=block, extract.block=i), profile it, and list it under the spec's "
            f"inputs as {ctx.feature_set}_block<i> (or name the sets in block_search.blocks)"
        )
    unknown = [n for n in names if n not in ctx.sets]
    if unknown:
        raise SpecError(
            f"analyses.block_search.blocks: no feature set(s) {unknown} (feature sets: "
            f"{', '.join(ctx.sets)})"
        )
    if params.get("exclude_controls", True):
        meta, X = ctx.cols.drop_controls(meta, X)
    meta, X = _with_moa(meta, X, ctx, "block_search")
    label, split_by = _label_and_split(meta, ctx, params, "block_search")
    blocks: dict[str, np.ndarray] = {}
    for n in names:
        _, Xm, Xb = _aligned(meta, X, ctx.sets[n], ctx, params.get("keys"), "block_search")
        if len(Xb) != len(meta):
            raise NotEvaluable(
                f"block set '{n}' lacks {len(meta) - len(Xb)} of this set's profiles"
            )
        blocks[n] = Xb
    blocks[f"{ctx.feature_set} (final)"] = np.asarray(X)
    kw = dict(
        labels=[label],
        classifier=params.get("classifier", "knn"),
        k=int(params.get("k", 5)),
        split_by=split_by,
        test_size=float(params.get("test_size", 0.25)),
        seed=ctx.seed,
    )
    table, summary = block_search(meta, blocks, **kw)
    best = summary[label]
    # baseline: the best block with the labels shuffled across profiles (no information)
    shuffled = meta.assign(
        **{label: meta[label].sample(frac=1.0, random_state=ctx.seed).to_numpy()}
    )
    _, null = block_search(shuffled, {best["best_block"]: blocks[best["best_block"]]}, **kw)
    final = table.loc[table.block == f"{ctx.feature_set} (final)", "macro_f1"]
    metrics = {
        "best_block_macro_f1": best["macro_f1"],
        "final_block_macro_f1": float(final.iloc[0]),
        "best_block_index": float(list(blocks).index(best["best_block"])),
        "permuted_label_macro_f1": null[label]["macro_f1"],
        "n_blocks": len(blocks),
    }
    out = _result(metrics, {"blocks": table})
    n_test = int(table.loc[table.is_best, "n_test"].iloc[0]) if "n_test" in table else np.nan
    out.stats["best_block_macro_f1"] = _baseline(metrics["permuted_label_macro_f1"], n_test)
    return out


run_block_search.reads_sets = True


def _run_layout(
    ctx: EvalContext,
    given: str | None,
    name: str,
    what: str = "its attention store (_attention.zarr) and the crops",
):
    """The `celldino run` folder of this feature set (its profiles are `<run>/profiles/<set>.*`),
    or `given` (the analysis's run_dir); NotEvaluable when there is none."""
    from celldino.io.runlayout import RunLayout

    if given:
        root = Path(given)
    else:
        src = getattr(ctx.sets.get(ctx.feature_set), "source", "")
        root = Path(src).resolve().parent.parent if src else None
    if root is None or not RunLayout(root).cells.exists():
        raise NotEvaluable(
            f"{name} reads a `celldino run` folder ({what}) and "
            f"'{ctx.feature_set}' does not come from one; set analyses.{name}.run_dir"
        )
    return RunLayout(root)


def _attention_store(ctx: EvalContext, params: dict, name: str, arrays: tuple[str, ...]):
    from celldino.io import cropstore
    from celldino.io.attention_store import read_attention_store

    lay = _run_layout(ctx, params.get("run_dir"), name)
    store = lay.attention(params.get("embeddings") or ctx.feature_set)
    if not store.exists():
        raise NotEvaluable(
            f"no attention store {store}: run `celldino extract` (or `celldino run`) with "
            "extract.attention_sample=N or extract.attention_cells=[...]"
        )
    data, attrs = read_attention_store(store, arrays)
    ids = [str(c) for c in attrs["cell_ids"]]
    if len(ids) < 2:
        raise NotEvaluable(f"{store} holds {len(ids)} cell(s); {name} needs 2 or more")
    return lay, data, attrs, ids, cropstore


def run_attention_iou(meta, X, ctx: EvalContext, **params: Any) -> AnalysisResult:
    """IoU of each attention head's Otsu mask with each channel's, vs a shuffled-cell null."""
    from celldino.eval.subcellular import head_channel_iou

    lay, data, attrs, ids, cropstore = _attention_store(
        ctx, params, "attention_iou", ("attn_maps",)
    )
    maps = data["attn_maps"]
    if maps.ndim == 5:  # channel-adaptive: (n, heads, C, h, w), one map per head and channel
        maps = maps.reshape(maps.shape[0], -1, *maps.shape[-2:])
    rows = cropstore.rows_of_cells(lay.prep, ids)
    images = cropstore.read_crops(lay.prep, rows.loc[ids, "row"].to_numpy()).astype(np.float32)
    channels = [str(c) for c in attrs["channels"]]
    iou = head_channel_iou(maps, images, channel_names=channels)
    # baseline: each cell's attention against the next cell's channels (same heads, no pairing)
    null = head_channel_iou(maps, np.roll(images, 1, axis=0), channel_names=channels)
    long = iou.stack().rename("iou").reset_index()
    long.columns = ["head", "channel", "iou"]
    long["null_iou"] = null.stack().to_numpy()
    metrics = {
        "best_channel_iou": float(np.nanmean(iou.max(axis=1))),
        "null_best_channel_iou": float(np.nanmean(null.max(axis=1))),
        "max_iou": float(np.nanmax(iou.to_numpy())),
        "null_max_iou": float(np.nanmax(null.to_numpy())),
        "n_cells": len(ids),
        "n_heads": iou.shape[0],
    }
    out = _result(metrics, {"head_channel_iou": long})
    out.stats["best_channel_iou"] = _baseline(metrics["null_best_channel_iou"], len(ids), "cells")
    return out


def run_discriminative_patches(meta, X, ctx: EvalContext, **params: Any) -> AnalysisResult:
    """Share of group A's patch tokens whose nearest tokens are nearly all A, vs shuffled groups."""
    from celldino.eval.subcellular import discriminative_patches

    lay, data, attrs, ids, cropstore = _attention_store(
        ctx, params, "discriminative_patches", ("patch",)
    )
    group_by = params.get("group_by")
    if not group_by:
        cols = cropstore.cells_columns(lay.prep)
        group_by = next((c for c in (ctx.cols.moa, ctx.cols.compound) if c in cols), None)
        if group_by is None:
            raise NotEvaluable(
                f"the cells table has neither {ctx.cols.moa} nor {ctx.cols.compound}; set "
                "analyses.discriminative_patches.group_by"
            )
    groups = cropstore.rows_of_cells(lay.prep, ids, label=group_by).loc[ids, "label"].astype(str)
    counts = groups.value_counts()
    a, b = params.get("group_a"), params.get("group_b")
    if a is None or b is None:
        if len(counts) < 2:
            raise NotEvaluable(
                f"the {len(ids)} cells of the attention store are all in one {group_by} group; "
                "store more cells (extract.attention_sample) or set group_a / group_b"
            )
        a = a or counts.index[0]
        b = b or next(g for g in counts.index if g != a)
    kw = dict(
        group_a=a,
        group_b=b,
        k=int(params.get("k", 10)),
        purity=float(params.get("purity", 0.9)),
        max_tokens=int(params.get("max_tokens", 20000)),
        seed=ctx.seed,
    )
    P = data["patch"]
    table, summary = discriminative_patches(P, groups.to_numpy(), **kw)
    # baseline: the same images with their group labels shuffled
    shuffled = np.random.default_rng(ctx.seed).permutation(groups.to_numpy())
    if (shuffled == str(a)).any() and (shuffled == str(b)).any():
        _, null = discriminative_patches(P, shuffled, **kw)
        null_frac = null["n_discriminative"] / max(null["n_tokens_a"], 1)
    else:
        null_frac = float("nan")
    metrics = {
        "fraction_discriminative": summary["n_discriminative"] / max(summary["n_tokens_a"], 1),
        "null_fraction_discriminative": null_frac,
        "n_discriminative": summary["n_discriminative"],
        "n_tokens_a": summary["n_tokens_a"],
        "n_images_a": int((groups == str(a)).sum()),
        "n_images_b": int((groups == str(b)).sum()),
    }
    table.insert(0, "group_a", str(a))
    table.insert(1, "group_b", str(b))
    out = _result(metrics, {"tokens": table})
    out.stats["fraction_discriminative"] = _baseline(null_frac, len(ids), "images")
    return out


def run_cell_probe(meta, X, ctx: EvalContext, **params: Any) -> AnalysisResult:
    """Single-cell MoA probes (linear, DINO's weighted 20-NN), leave one plate out, on the same
    cells for every feature set, read from the `celldino run` folder (eval/cell_probe.py)."""
    from celldino.eval import cell_probe as cp
    from celldino.probes import labelled_rows, stratified_sample

    name = ctx.feature_set
    src = str(getattr(ctx.sets.get(name), "source", "") or "")
    if src and not params.get("run_dir") and not Path(src).exists():  # derived: pca(engineered)
        raise NotEvaluable(
            f"'{name}' is computed by the evaluation ({src}), not read from a run folder: it has "
            "no per-cell table; cell_probe scores the sets with per-cell features "
            "(embeddings/<set>/, prep/engineered.parquet)"
        )
    lay = _run_layout(ctx, params.get("run_dir"), "cell_probe", "the per-cell embeddings")
    tables = cp.read_cell_tables(lay.root, list(ctx.sets) or [name])
    if name not in tables:
        raise NotEvaluable(
            f"cell_probe scores single cells and '{name}' has no per-cell table in {lay.root} "
            f"(embeddings/{name}/, or prep/engineered.parquet for engineered; derived sets such "
            "as pca_engineered have none)"
        )
    cells, feats = cp.align_cells(tables, key=params.get("cell_id") or cp.CELL_ID)
    c = ctx.cols
    label = params.get("label") or c.require(cells, "moa", "cell_probe")
    split_by = params.get("split_by") or c.require(cells, "plate", "cell_probe")
    for role, col in (("label", label), ("split_by", split_by)):
        if col not in cells.columns:
            raise SpecError(
                f"analyses.cell_probe.{role}: no column '{col}' in the per-cell tables "
                f"(metadata columns: {', '.join(map(str, cells.columns))})"
            )
    controls = None
    if params.get("exclude_controls", True) and c.control in cells.columns:
        controls = is_control_row(cells, c.control, c.control_value)
    idx = np.flatnonzero(labelled_rows(cells[label], controls))  # as train's monitor
    if len(idx) == 0:
        raise NotEvaluable(f"cell_probe: no treated cell has a {label} label")
    max_cells = int(params.get("max_cells", cp.MAX_CELLS))
    idx = idx[stratified_sample(cells[label].astype(str).to_numpy()[idx], max_cells, ctx.seed)]
    reference = params.get("reference", "random_init")
    probed = {n: feats[n][idx] for n in dict.fromkeys([name, reference]) if n in feats}
    summary, folds, paired = cp.cell_probe(
        cells.iloc[idx].reset_index(drop=True),
        probed,
        label=label,
        split_by=split_by,
        well=c.well,
        k=int(params.get("k", cp.KNN_K)),
        temperature=float(params.get("temperature", cp.KNN_T)),
        knn_zscore=bool(params.get("knn_zscore", True)),
        C=float(params.get("C", 1.0)),
        max_iter=int(params.get("max_iter", cp.MAX_ITER)),
        seed=ctx.seed,
        n_boot=ctx.n_boot,
        reference=reference,
    )
    mine = summary[summary.feature_set == name]
    metrics = dict(zip(mine.metric, mine.value, strict=True))
    metrics.update(
        n_cells=len(idx),
        n_plates=folds["fold"].nunique(),
        n_classes=cells[label].iloc[idx].nunique(),
    )
    out = _result(metrics, {"folds": folds[folds.feature_set == name].reset_index(drop=True)})
    mine_paired = paired[paired.feature_set == name]
    if len(mine_paired):
        out.tables["paired_difference"] = mine_paired.reset_index(drop=True)
    for r in mine.itertuples(index=False):
        out.stats[r.metric] = {col: getattr(r, col) for col in STAT_COLUMNS}
    return out


run_cell_probe.reads_sets = True  # the cells are those every per-cell set holds


def run_plate_effect(meta, X, ctx: EvalContext, **params: Any) -> AnalysisResult:
    """Chance-corrected 1-NN agreement on plate vs on treatment; flags plate > treatment."""
    from celldino.eval.batch_effect import ALPHA, MARGIN, plate_effect

    plate = params.get("plate") or ctx.cols.plate
    if plate not in meta.columns:  # a default analysis of `celldino run`: skip, do not fail
        raise NotEvaluable(
            f"plate_effect needs the plate column '{plate}', which the profiles lack; set "
            "columns.plate (or analyses.plate_effect.plate)"
        )
    metrics, table = plate_effect(
        meta,
        X,
        plate=plate,
        treatment=_treatment_keys(meta, ctx, params, "plate_effect"),
        margin=float(params.get("margin", MARGIN)),
        alpha=float(params.get("alpha", ALPHA)),
        n_permutations=int(params.get("n_permutations", 999)),
        seed=ctx.seed,
    )
    out = _result(metrics, {"plates": table})
    n = metrics["n_profiles"]
    out.stats["plate_agreement"] = _baseline(0.0, n, "profiles", p=metrics["plate_p_value"])
    return out


# name → function(meta, X, ctx, **params)
ANALYSES: dict[str, Callable[..., AnalysisResult | dict]] = {
    "nsc": run_nsc,
    "map_replicate": run_map_replicate,
    "map_moa": run_map_moa,
    "activity": run_activity,
    "enrichment": run_enrichment,
    "classify": run_classify,
    "lowshot": run_lowshot,
    "moa_prediction": run_moa_prediction,
    "multitask": run_multitask,
    "factors": run_factors,
    "similarity": run_similarity,
    "heterogeneity": run_heterogeneity,
    "pseudotime": run_pseudotime,
    "mantel": run_mantel,
    "cca": run_cca,
    "block_search": run_block_search,
    "attention_iou": run_attention_iou,
    "discriminative_patches": run_discriminative_patches,
    "plate_effect": run_plate_effect,
    "cell_probe": run_cell_probe,
}

DEFAULT_ANALYSES = ("nsc", "map_replicate", "activity")
