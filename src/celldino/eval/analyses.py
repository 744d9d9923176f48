"""Every analysis `celldino evaluate` can run, and the registry `ANALYSES` that names them.

Each `run_*` adapter has the runner's signature `fn(meta, X, ctx, **params)`: it reads column
roles from `ctx.cols` (compound, moa, plate, well, control…), takes the spec's parameters, calls
the public function and returns the numbers for the metrics table plus the detail tables
(`AnalysisResult`). The analyses that need more than one profile matrix (block search, CCA,
Mantel, attention) are Python API only. Adding one: write `run_<name>` here and register it in
`ANALYSES` with one line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from celldino.eval.activity import phenotypic_activity
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
from celldino.log import get_logger

logger = get_logger(__name__)


# ---- retrieval and matching ------------------------------------------------------------------


def map_kwargs(ctx: EvalContext, params: dict) -> dict:
    try:
        null_size = int(params.get("null_size", ctx.null_size))
        threshold = float(params.get("threshold", ctx.threshold))
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
    metrics, table = nsc_nscb(
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
    )
    if not metrics["NSC_n"]:
        comp = c.require(meta, "compound", "nsc")
        raise NotEvaluable(
            "no treatment has a nearest neighbour from another compound: NSC needs treatment "
            f"profiles of at least 2 compounds with a MoA ({comp} has "
            f"{meta[comp].nunique()} value(s))"
        )
    return AnalysisResult(metrics, {"neighbours": table})


def run_map_replicate(
    meta: pd.DataFrame, X: np.ndarray, ctx: EvalContext, **params
) -> AnalysisResult:
    """Replicate retrieval: same compound (and dose) vs other compounds and controls."""
    c = ctx.cols
    by = params.get("by") or [c.require(meta, "compound", "map_replicate")] + (
        [c.dose] if c.present(meta, "dose") else []
    )
    kw = map_kwargs(ctx, params)
    ap, maps = retrieval_map(
        meta,
        X,
        by=by,
        negatives=params.get("negatives", "others"),
        pos_diffby=params.get("pos_diffby", ()),
        **kw,
    )  # the spec's threshold, as the mAP table used it
    return AnalysisResult(summarize(maps, kw["threshold"]), {"map": maps.drop(columns="indices")})


def run_map_moa(meta: pd.DataFrame, X: np.ndarray, ctx: EvalContext, **params) -> AnalysisResult:
    """MoA retrieval: same MoA, other compound, against other MoAs."""
    c = ctx.cols
    meta, X = _with_moa(meta, X, ctx, "map_moa")
    kw = map_kwargs(ctx, params)
    ap, maps = moa_map(
        meta,
        X,
        moa=c.require(meta, "moa", "map_moa"),
        compound=c.require(meta, "compound", "map_moa"),
        **kw,
    )
    return AnalysisResult(summarize(maps, kw["threshold"]), {"map": maps.drop(columns="indices")})


def run_activity(meta: pd.DataFrame, X: np.ndarray, ctx: EvalContext, **params) -> AnalysisResult:
    """Phenotypic activity: each compound (all doses, or `by`) against the controls."""
    by = params.get("by") or [ctx.cols.require(meta, "compound", "activity")]
    _, maps, summary = phenotypic_activity(meta, X, by=by, **map_kwargs(ctx, params))
    return AnalysisResult(summary, {"map": maps.drop(columns="indices")})


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
    )
    metrics = {}
    for _, r in table.iterrows():
        key = f"knn_k{int(r.k)}" if r.classifier == "knn" else r.classifier
        metrics[f"{key}_macro_f1"] = r.macro_f1
    return _result(metrics, {"classify": table})


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
}

DEFAULT_ANALYSES = ("nsc", "map_replicate", "activity")
