"""Runner entries (`celldino evaluate`) for the classification and biology analyses.

Each `run_*` has the runner's signature `fn(meta, feats, ctx, **params)`: it reads column roles
from `ctx.cols` (compound, moa, plate, well, control…), takes the spec's parameters, calls the
public function and returns the numbers for the metrics table plus the detail tables. The
analyses that need more than one profile matrix (block search, CCA, Mantel, attention) are
Python API only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from celldino.eval.classify import MLPOptions, classify
from celldino.eval.factors import factor_mutual_information
from celldino.eval.heterogeneity import heterogeneity
from celldino.eval.lowshot import lowshot_curve
from celldino.eval.moa import moa_prediction
from celldino.eval.multitask import multitask_activity
from celldino.eval.similarity import group_similarity

if TYPE_CHECKING:
    from celldino.eval.runner import AnalysisResult, EvalContext


def _result(metrics: dict, tables: dict[str, pd.DataFrame]) -> AnalysisResult:
    from celldino.eval.runner import AnalysisResult  # the runner imports this module

    numeric = {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
    }
    return AnalysisResult(numeric, tables)


def _drop_controls(meta: pd.DataFrame, feats: np.ndarray, ctx: EvalContext, params: dict):
    c = ctx.cols
    if not params.get("exclude_controls", True) or c.control not in meta.columns:
        return meta, feats
    keep = (meta[c.control].astype(str) != str(c.control_value)).to_numpy()
    return meta[keep].reset_index(drop=True), np.asarray(feats)[keep]


def _label_and_split(meta: pd.DataFrame, ctx: EvalContext, params: dict, name: str):
    c = ctx.cols
    label = params.get("label") or c.require(meta, "moa", name)
    split_by = params.get("split_by") or c.require(meta, "compound", name)
    if label not in meta.columns:
        from celldino.eval.runner import SpecError

        raise SpecError(f"analysis '{name}': label column '{label}' not in the profiles")
    return label, split_by


def _mlp_options(params: dict) -> MLPOptions:
    fields = MLPOptions.__dataclass_fields__
    opts = {k: v for k, v in (params.get("mlp") or {}).items() if k in fields}
    if "hidden" in opts:
        opts["hidden"] = tuple(opts["hidden"])
    return MLPOptions(**opts)


def run_classify(meta, feats, ctx: EvalContext, **params: Any) -> AnalysisResult:
    """kNN (k = 1…50), linear probe and MLP macro-F1 on a group split (default by compound)."""
    meta, feats = _drop_controls(meta, feats, ctx, params)
    label, split_by = _label_and_split(meta, ctx, params, "classify")
    table = classify(
        meta, feats, label_col=label, split_by=split_by,
        classifiers=tuple(params.get("classifiers", ("knn", "linear", "mlp"))),
        ks=tuple(params.get("ks", (1, 5, 10, 20, 50))),
        test_size=float(params.get("test_size", 0.25)),
        mlp_options=_mlp_options(params), seed=ctx.seed,
    )  # fmt: skip
    metrics = {}
    for _, r in table.iterrows():
        key = f"knn_k{int(r.k)}" if r.classifier == "knn" else r.classifier
        metrics[f"{key}_macro_f1"] = r.macro_f1
    return _result(metrics, {"classify": table})


def run_lowshot(meta, feats, ctx: EvalContext, **params: Any) -> AnalysisResult:
    """Low-shot curve: classifiers retrained on 1 %…100 % of the training rows."""
    meta, feats = _drop_controls(meta, feats, ctx, params)
    label, split_by = _label_and_split(meta, ctx, params, "lowshot")
    table = lowshot_curve(
        meta, feats, label_col=label, split_by=split_by,
        fractions=tuple(params.get("fractions", (0.01, 0.02, 0.05, 0.1, 0.25, 1.0))),
        classifiers=tuple(params.get("classifiers", ("knn", "linear"))),
        ks=tuple(params.get("ks", (5,))), n_repeats=int(params.get("n_repeats", 1)),
        mlp_options=_mlp_options(params), seed=ctx.seed,
    )  # fmt: skip
    mean = table.groupby(["fraction", "classifier", "k"], dropna=False).macro_f1.mean()
    metrics = {}
    for (frac, clf, k), v in mean.items():
        key = f"knn_k{int(k)}" if clf == "knn" else clf
        metrics[f"{key}_macro_f1_at_{frac:g}"] = v
    return _result(metrics, {"lowshot": table})


def run_moa_prediction(meta, feats, ctx: EvalContext, **params: Any) -> AnalysisResult:
    """Multi-label MoA prediction, leave-compound-out, micro PR-AUC; controls excluded."""
    c = ctx.cols
    per_moa, predictions, summary = moa_prediction(
        meta, feats,
        moa_col=c.require(meta, "moa", "moa_prediction"),
        compound_col=c.require(meta, "compound", "moa_prediction"),
        control_col=c.control if c.control in meta.columns else None,
        control_values=(c.control_value,), sep=c.moa_sep or "|",
        classifier=params.get("classifier", "linear"), n_folds=params.get("n_folds", 5),
        min_compounds=int(params.get("min_compounds", 2)),
        mlp_options=_mlp_options(params), seed=ctx.seed,
    )  # fmt: skip
    return _result(summary, {"per_moa": per_moa, "predictions": predictions})


def run_multitask(meta, feats, ctx: EvalContext, **params: Any) -> AnalysisResult:
    """Multi-task activity prediction (masked BCE) from `task_cols` or `task_prefix` columns."""
    from celldino.eval.runner import SpecError

    tasks = list(params.get("task_cols") or [])
    prefix = params.get("task_prefix")
    if prefix:
        tasks += [col for col in meta.columns if str(col).startswith(prefix)]
    if not tasks:
        raise SpecError(
            "analysis 'multitask' needs task_cols: [...] or task_prefix: 'Metadata_assay_'"
        )
    table, summary = multitask_activity(
        meta, feats, task_cols=tasks,
        split_by=params.get("split_by") or ctx.cols.require(meta, "compound", "multitask"),
        test_size=float(params.get("test_size", 0.25)), epochs=int(params.get("epochs", 50)),
        threshold=float(params.get("threshold", 0.9)), seed=ctx.seed,
    )  # fmt: skip
    return _result(summary, {"tasks": table})


def run_factors(meta, feats, ctx: EvalContext, **params: Any) -> AnalysisResult:
    """Mutual information of each feature with each factor; fraction of features per factor."""
    c = ctx.cols
    factors = params.get("factor_cols") or [
        col for role in ("moa", "plate", "batch") if (col := c.present(meta, role))
    ]  # not compound or well by default: nested in MoA / unique per profile, they win trivially
    table, summary = factor_mutual_information(
        meta, feats, factor_cols=factors, n_bins=int(params.get("n_bins", 10)),
        normalize=params.get("normalize", "none"),
    )  # fmt: skip
    metrics = {f"fraction_top_{r.factor}": r.fraction_top for r in summary.itertuples()}
    metrics.update({f"mean_mi_{r.factor}": r.mean_mi for r in summary.itertuples()})
    return _result(metrics, {"mutual_information": table, "factors": summary})


def run_similarity(meta, feats, ctx: EvalContext, **params: Any) -> AnalysisResult:
    """Group-mean similarity matrix in hierarchical order (long table: group_a, group_b, sim)."""
    meta, feats = _drop_controls(meta, feats, ctx, params)
    group = params.get("group_col") or ctx.cols.require(meta, "moa", "similarity")
    sim = group_similarity(meta, feats, group_col=group, metric=params.get("metric", "cosine"))
    long = sim.stack().rename("similarity").reset_index()
    long.columns = ["group_a", "group_b", "similarity"]
    long["order_a"] = long.group_a.map({g: i for i, g in enumerate(sim.index)})
    long["order_b"] = long.group_b.map({g: i for i, g in enumerate(sim.index)})
    off = sim.to_numpy()[~np.eye(len(sim), dtype=bool)]
    metrics = {"n_groups": len(sim), "mean_offdiagonal_similarity": off.mean() if off.size else 0}
    return _result(metrics, {"similarity": long})


def run_heterogeneity(meta, feats, ctx: EvalContext, **params: Any) -> AnalysisResult:
    """Per-field std of single-cell features, max per treatment, precision@k vs annotation."""
    c = ctx.cols
    fields = params.get("field_cols") or [
        col for col in (c.plate, c.well, "Metadata_Site") if col in meta.columns
    ]
    treatment = params.get("treatment_col") or c.require(meta, "compound", "heterogeneity")
    exclude = params.get("exclude")
    if exclude is None and c.control in meta.columns:
        is_ctl = meta[c.control].astype(str) == str(c.control_value)
        exclude = meta.loc[is_ctl, treatment].astype(str).unique().tolist()
    ranked, summary = heterogeneity(
        meta, feats, field_cols=fields, treatment_col=treatment,
        annotated=params.get("annotated"), annotation_col=params.get("annotation_col"),
        exclude=exclude or (), ks=tuple(params.get("ks", (5, 10))),
        min_cells=int(params.get("min_cells", 3)),
    )  # fmt: skip
    return _result(summary, {"treatments": ranked})


def run_pseudotime(meta, feats, ctx: EvalContext, **params: Any) -> AnalysisResult:
    """Diffusion pseudotime (scanpy) from a root group (`root_col`, `root_value`)."""
    from celldino.eval.pseudotime import diffusion_pseudotime

    out, summary = diffusion_pseudotime(
        meta, feats, root=params.get("root"), root_col=params.get("root_col"),
        root_value=params.get("root_value"), n_neighbors=int(params.get("n_neighbors", 15)),
        n_pcs=int(params.get("n_pcs", 0)), n_dcs=int(params.get("n_dcs", 10)), seed=ctx.seed,
    )  # fmt: skip
    return _result(summary, {"pseudotime": out})


RUNS = {
    "classify": run_classify,
    "lowshot": run_lowshot,
    "moa_prediction": run_moa_prediction,
    "multitask": run_multitask,
    "factors": run_factors,
    "similarity": run_similarity,
    "heterogeneity": run_heterogeneity,
    "pseudotime": run_pseudotime,
}
