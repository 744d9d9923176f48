"""Mechanism-of-action prediction: multi-label, leave-compound-out cross-validation, PR-AUC.

Profiles of one compound (all its doses and replicates) are held out together, so a prediction
never rests on having seen the same compound; negative controls are excluded. A compound can have
several MoAs ('|'-joined), so this is multi-label: one-vs-rest logistic regression (default) or
the paper's MLP with BCE-with-logits. The score is the micro-averaged area under the
precision–recall curve (average precision) over all out-of-fold predictions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression

from celldino.eval.classify import (
    MLPOptions,
    as_matrix,
    encode_multilabel,
    fit_mlp,
    predict_mlp,
    zscore_fit,
)
from celldino.eval.spec import is_control_row, profiles_of
from celldino.eval.splits import group_folds
from celldino.log import get_logger, progress

if TYPE_CHECKING:
    from anndata import AnnData

logger = get_logger(__name__)


def average_precision(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Area under the step precision–recall curve: Σ (R_i − R_{i−1}) P_i over distinct scores."""
    y = np.asarray(y_true).ravel().astype(bool)
    s = np.asarray(scores).ravel().astype(np.float64)
    n_pos = y.sum()
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-s, kind="stable")
    y, s = y[order], s[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # end of each tie group
    tp = np.cumsum(y)[last]
    precision = tp / (last + 1)
    recall = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def moa_prediction(
    meta: pd.DataFrame | AnnData,
    X=None,
    *,
    moa: str = "Metadata_MoA",
    compound: str = "Metadata_Compound",
    control: str | None = "Metadata_pert_type",
    control_value: str | Sequence[str] = "control",
    moa_sep: str = "|",
    classifier: str = "linear",
    n_folds: int | None = 5,
    min_compounds: int = 2,
    mlp_options: MLPOptions | None = None,
    C: float = 1.0,
    seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Leave-compound-out multi-label MoA prediction.

    Rows whose `control` column holds `control_value` (one value or several) and rows without a MoA are dropped; MoAs
    with fewer than `min_compounds` compounds are dropped (they cannot be predicted for a
    held-out compound). `n_folds=None` is leave-one-compound-out. Returns the per-MoA table
    (moa, n_compounds, n_profiles, average_precision), the out-of-fold predictions (row,
    compound, fold, moa, label, score; `row` indexes `meta`) and a summary with `micro_pr_auc`,
    sizes and the seed.
    """
    meta, X = profiles_of(meta, X)
    if classifier not in ("linear", "mlp"):
        raise ValueError(f"MoA classifier must be 'linear' or 'mlp', got {classifier!r}")
    for c in (moa, compound):
        if c not in meta.columns:
            raise KeyError(f"column '{c}' not in the metadata: {list(meta.columns)}")
    X = as_matrix(X, len(meta))
    controls = (
        is_control_row(meta, control, control_value)
        if control is not None
        else np.zeros(len(meta), dtype=bool)
    )
    has_moa = meta[moa].notna().to_numpy() & (meta[moa].astype(str).str.strip() != "")
    keep = np.flatnonzero(~controls & has_moa)
    sub = meta.iloc[keep].reset_index(drop=True)
    Y, classes = encode_multilabel(sub, moa, sep=moa_sep)
    # MoAs seen in at least `min_compounds` compounds
    comp = sub[compound].astype(str).to_numpy()
    n_comp = np.array([len(np.unique(comp[Y[:, j] > 0])) for j in range(len(classes))])
    usable = n_comp >= min_compounds
    if not usable.any():
        raise ValueError(
            f"no MoA in '{moa}' has {min_compounds}+ compounds after excluding controls; "
            "leave-compound-out prediction needs several compounds per MoA (lower min_compounds?)"
        )
    Y, classes, n_comp = Y[:, usable], classes[usable], n_comp[usable]
    rows_with_label = Y.sum(axis=1) > 0
    keep, sub, Y, comp = (
        keep[rows_with_label],
        sub[rows_with_label],
        Y[rows_with_label],
        comp[rows_with_label],
    )
    sub = sub.reset_index(drop=True)
    Xs = X[keep]
    folds = group_folds(sub, by=compound, n_splits=n_folds, seed=seed)
    scores = np.zeros_like(Y, dtype=np.float64)
    fold_of = np.full(len(sub), -1)
    for f, (train, test) in enumerate(progress(folds, desc="MoA folds")):
        fold_of[test] = f
        assert not set(comp[train]) & set(comp[test])  # leave-compound-out by construction
        if classifier == "mlp":
            model, mean, std = fit_mlp(
                Xs[train],
                Y[train],
                n_classes=Y.shape[1],
                options=mlp_options or MLPOptions(),
                seed=seed,
            )
            logits = predict_mlp(model, Xs[test], mean, std)
            scores[test] = 1.0 / (1.0 + np.exp(-logits))
            continue
        mean, std = zscore_fit(Xs[train])
        xtr, xte = (Xs[train] - mean) / std, (Xs[test] - mean) / std
        for j in range(Y.shape[1]):
            yj = Y[train, j]
            if yj.min() == yj.max():  # no positive (or no negative) left in training
                scores[test, j] = yj[0]
                continue
            clf = LogisticRegression(C=C, max_iter=2000, class_weight="balanced", random_state=seed)
            scores[test, j] = clf.fit(xtr, yj).predict_proba(xte)[:, 1]
    per_moa = pd.DataFrame(
        {
            "moa": classes,
            "n_compounds": n_comp,
            "n_profiles": Y.sum(axis=0).astype(int),
            "average_precision": [
                average_precision(Y[:, j], scores[:, j]) for j in range(Y.shape[1])
            ],
            "classifier": classifier,
            "seed": seed,
        }
    )
    predictions = pd.DataFrame(
        {
            "row": np.repeat(keep, Y.shape[1]),
            "compound": np.repeat(comp, Y.shape[1]),
            "fold": np.repeat(fold_of, Y.shape[1]),
            "moa": np.tile(classes, len(sub)),
            "label": Y.ravel().astype(int),
            "score": scores.ravel(),
        }
    )
    summary = {
        "micro_pr_auc": average_precision(Y, scores),
        "macro_pr_auc": float(per_moa.average_precision.mean()),
        "prevalence": float(Y.mean()),
        "n_profiles": int(len(sub)),
        "n_compounds": int(len(np.unique(comp))),
        "n_moas": int(len(classes)),
        "n_controls_excluded": int(controls.sum()),
        "n_folds": len(folds),
        "classifier": classifier,
        "seed": seed,
    }
    return per_moa, predictions, summary
