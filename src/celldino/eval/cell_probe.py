"""Cell-level probes, as DINO and Cell-DINO evaluate: the MoA of single cells, leave one plate out.

Each plate is held out in turn; the probes are fitted on the cells of the other plates and
predict the held-out plate's cells. Two probes, on every feature set, on the same cells:

- `linear`: scikit-learn's `LogisticRegression` (lbfgs, `class_weight="balanced"` as
  `classify.linear_probe`, fixed `random_state`) on features z-scored with the training plates'
  mean and standard deviation;
- `knn`: DINO's weighted k-NN (facebookresearch/dino `eval_knn.py`, `knn_classifier`; the one
  implementation is `celldino.probes.knn_predict`, shared with train's monitor): features
  L2-normalised, cosine similarity, the k (20) most similar training cells vote with weight
  `exp(similarity / T)` (T = 0.07), the class with the largest summed weight wins. By default the
  features are z-scored with the training plates' statistics first, as for the linear probe, so
  that engineered features (areas in pixels beside intensities) are not compared on raw scales;
  `knn_zscore=False` gives DINO's exact protocol on the raw features.

The score of a probe is the macro-F1 of each held-out plate, averaged over the plates (per-fold
scores in the `folds` table). Chance: the better label-only baseline of `stats.f1_chance` (most
frequent training class, or random draws from the training class frequencies) on each fold,
averaged as the score is. The 95% interval is a cluster bootstrap of the held-out predictions
that redraws wells (cells of a well are not independent) within each held-out plate, so every
fold keeps its place in the average; the same draws serve every feature set, so the difference
between two sets on the same cells has its own interval (`paired` table).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from celldino.eval.classify import encode_labels, zscore_fit
from celldino.eval.spec import NotEvaluable
from celldino.eval.stats import (
    STAT_COLUMNS,
    bootstrap_counts,
    f1_chance,
    few_queries,
    join_flags,
    macro_f1_batch,
    percentile_ci,
    rng_for,
    warn_flags,
)
from celldino.log import get_logger
from celldino.probes import knn_predict

logger = get_logger(__name__)

KNN_K = 20  # DINO's default number of neighbours ("20 is usually working the best")
KNN_T = 0.07  # DINO's temperature of the voting weights
MAX_CELLS = 4000  # cells probed (a stratified subsample of larger screens)
MAX_ITER = 5000  # lbfgs iterations of the linear probe
CELL_ID = "Metadata_CellID"
ENGINEERED_PREFIXES = ("Nuclei_", "Cells_", "Cytoplasm_")
PROBES = ("linear", "knn")


# ---- the probes --------------------------------------------------------------------------------


def linear_predict(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_test: np.ndarray,
    *,
    C: float = 1.0,
    max_iter: int = MAX_ITER,
    seed: int = 0,
) -> tuple[np.ndarray, bool]:
    """Logistic regression fitted on the (already standardised) training rows: (class codes of
    the test rows, whether lbfgs converged). One training class: that class for every row."""
    y_train = np.asarray(y_train)
    if len(np.unique(y_train)) < 2:
        return np.full(len(X_test), y_train[0]), True
    clf = LogisticRegression(C=C, max_iter=max_iter, class_weight="balanced", random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(X_train, y_train)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return clf.predict(X_test), converged


# ---- cells ---------------------------------------------------------------------------------------


def stratified_subsample(labels: np.ndarray, max_cells: int, seed: int) -> np.ndarray:
    """Sorted row indices of `max_cells` rows (more only when there are more labels than that:
    every label keeps at least one row), each label keeping its share (largest remainders).
    Deterministic for a seed and a row order."""
    labels = np.asarray(labels)
    n = len(labels)
    if n <= max_cells:
        return np.arange(n)
    names, codes = np.unique(labels, return_inverse=True)
    size = np.bincount(codes, minlength=len(names))
    quota = size * max_cells / n
    take = np.maximum(np.floor(quota).astype(np.int64), 1)
    left = max_cells - int(take.sum())
    if left > 0:  # the largest remainders get one more
        order = np.argsort(-(quota - np.floor(quota)), kind="stable")
        for c in order[:left]:
            take[c] += take[c] < size[c]
    rng = rng_for(seed, "cell_probe_subsample")
    picked = [
        rng.choice(np.flatnonzero(codes == c), size=int(min(take[c], size[c])), replace=False)
        for c in range(len(names))
    ]
    return np.sort(np.concatenate(picked))


def align_cells(
    tables: Mapping[str, pd.DataFrame], *, key: str = CELL_ID
) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """The cells every table holds, matched on `key`, sorted by it: (metadata of the first
    table's `Metadata_*` columns, {name: feature matrix}). Features: `emb_*` columns, else the
    engineered prefixes; columns with a non-finite value are dropped (logged)."""
    ids = None
    for name, t in tables.items():
        if key not in t.columns:
            raise NotEvaluable(
                f"cell_probe: the per-cell table of '{name}' has no {key} column to match cells "
                "across feature sets; set analyses.cell_probe.cell_id to a column every per-cell "
                "table holds"
            )
        dup = t[key].astype(str).duplicated()
        if dup.any():
            raise NotEvaluable(
                f"cell_probe: {key} repeats in the per-cell table of '{name}' (e.g. "
                f"{t[key].astype(str)[dup].iloc[0]!r}); set analyses.cell_probe.cell_id to a "
                "unique cell id"
            )
        s = set(t[key].astype(str))
        ids = s if ids is None else ids & s
    ids = np.array(sorted(ids or ()), dtype=object)
    meta, feats = None, {}
    for name, t in tables.items():
        t = t.assign(**{key: t[key].astype(str)}).set_index(key).loc[ids]
        cols = [c for c in t.columns if c.startswith("emb_")] or [
            c for c in t.columns if c.startswith(ENGINEERED_PREFIXES)
        ]
        X = t[cols].to_numpy(np.float64)
        finite = np.isfinite(X).all(axis=0)
        if not finite.all():
            logger.info(
                "cell_probe: %s: %d of %d feature columns with non-finite values dropped",
                name,
                int((~finite).sum()),
                len(cols),
            )
        feats[name] = X[:, finite]
        if meta is None:
            meta = t[[c for c in t.columns if c.startswith("Metadata_")]].reset_index()
    return (meta if meta is not None else pd.DataFrame()), feats


def read_cell_tables(run_root: Path, names: list[str]) -> dict[str, pd.DataFrame]:
    """The per-cell table of each feature set of a `celldino run` folder that has one:
    `embeddings/<name>/` (finished extraction) or, for `engineered`, `prep/engineered.parquet`."""
    from celldino.io.embeddings import read_embeddings, read_manifest
    from celldino.io.prepared import read_engineered
    from celldino.io.runlayout import RunLayout

    lay = RunLayout(Path(run_root))
    out = {}
    for name in names:
        if read_manifest(lay.embeddings(name)) is not None:
            out[name] = read_embeddings(lay.embeddings(name))
        elif name == "engineered" and lay.engineered.exists():
            out[name] = read_engineered(lay.prep)
    return out


# ---- evaluation ----------------------------------------------------------------------------------


def well_bootstrap(
    y: np.ndarray,
    preds: Mapping,
    fold_of: np.ndarray,
    unit: np.ndarray,
    *,
    n_classes: int,
    n_boot: int,
    seed: int,
) -> dict:
    """(n_boot,) bootstrap replicates of the fold-averaged macro-F1 of each prediction vector in
    `preds`: within each held-out fold its units (wells) are drawn with replacement, a unit's
    cells all coming along; the same draws for every vector (so differences are paired).
    None per key when n_boot is 0."""
    if not n_boot:
        return dict.fromkeys(preds)
    rng = rng_for(seed, "cell_probe")
    fold_of, unit = np.asarray(fold_of), np.asarray(unit)
    draws = []
    for fold in sorted(set(fold_of)):
        idx = np.flatnonzero(fold_of == fold)
        codes, uniq = pd.factorize(pd.Series(unit[idx]))
        draws.append((idx, bootstrap_counts(len(uniq), n_boot, rng)[:, codes]))  # (B, n_test)
    return {
        key: np.mean([macro_f1_batch(y[i], pred[i], n_classes, w) for i, w in draws], axis=0)
        for key, pred in preds.items()
    }


# ---- the analysis ---------------------------------------------------------------------------------


def cell_probe(
    meta: pd.DataFrame,
    sets: Mapping[str, np.ndarray],
    *,
    label: str,
    split_by: str,
    well: str | None = None,
    k: int = KNN_K,
    temperature: float = KNN_T,
    knn_zscore: bool = True,
    C: float = 1.0,
    max_iter: int = MAX_ITER,
    seed: int = 0,
    n_boot: int = 1000,
    reference: str | None = "random_init",
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Leave-one-`split_by`-out linear probe and weighted k-NN on the cells of `meta` (rows
    aligned with every matrix of `sets`). Returns

    - `summary`: feature_set, metric (`linear_f1`, `knn<k>_f1`), value (macro-F1 averaged over
      the held-out groups), and STAT_COLUMNS (chance, well-bootstrap interval, n_queries = cells);
    - `folds`: feature_set, metric, fold, n_train, n_test, n_wells, macro_f1, chance;
    - `paired`: feature_set, reference, metric, difference (set − reference), ci_low, ci_high
      (the same bootstrap draws for both), for every set but `reference` when it is in `sets`.
    """
    meta = meta.reset_index(drop=True)
    y, classes = encode_labels(meta, label)
    n_classes = len(classes)
    fold_of = meta[split_by].astype(str).to_numpy()
    folds = sorted(set(fold_of))
    if len(folds) < 2:
        raise NotEvaluable(
            f"cell_probe holds out one {split_by} at a time and the cells come from "
            f"{len(folds)}; set analyses.cell_probe.split_by to a column with 2 or more groups"
        )
    flags: list[str] = []
    if well and well in meta.columns:
        unit = (pd.Series(fold_of) + "\x1f" + meta[well].astype(str)).to_numpy()
        unit_name = "wells"
    else:
        unit, unit_name = np.arange(len(meta)).astype(str), "cells"
        flags.append("no well column: the interval resamples cells")
    knn_name = f"knn{int(k)}_f1"
    metric_of = {"linear": "linear_f1", "knn": knn_name}
    preds = {s: {p: np.empty(len(y), np.int64) for p in PROBES} for s in sets}
    fold_rows, chances, not_converged = [], [], set()
    fold_f1: dict[tuple[str, str], list[float]] = {(s, p): [] for s in sets for p in PROBES}
    for fold in folds:
        test = fold_of == fold
        train = ~test
        chances.append(f1_chance(y[train], y[test], n_classes)["chance"])
        for name, X in sets.items():
            X = np.asarray(X, np.float64)
            mean, std = zscore_fit(X[train])
            Z = (X - mean) / std
            pl, ok = linear_predict(Z[train], y[train], Z[test], C=C, max_iter=max_iter, seed=seed)
            if not ok:
                not_converged.add(name)
            K = Z if knn_zscore else X
            names = knn_predict(K[train], classes[y[train]], K[test], k=k, temperature=temperature)
            pk = np.searchsorted(classes, names.astype(str))  # classes: sorted names
            preds[name]["linear"][test], preds[name]["knn"][test] = pl, pk
        n_wells = len(set(unit[test]))
        for name in sets:
            for p in PROBES:
                f1 = float(macro_f1_batch(y[test], preds[name][p][test], n_classes)[0])
                fold_f1[(name, p)].append(f1)
                fold_rows.append(
                    {
                        "feature_set": name,
                        "metric": metric_of[p],
                        "fold": fold,
                        "n_train": int(train.sum()),
                        "n_test": int(test.sum()),
                        "n_wells": n_wells,
                        "macro_f1": f1,
                        "chance": chances[-1],
                    }
                )
    fold_table = pd.DataFrame(fold_rows)
    boot = well_bootstrap(
        y,
        {(name, p): preds[name][p] for name in sets for p in PROBES},
        fold_of,
        unit,
        n_classes=n_classes,
        n_boot=n_boot,
        seed=seed,
    )
    n_units = len(set(unit))
    base_flags = [*flags, *few_queries(n_units, unit_name)]
    if n_classes < 2:
        base_flags.append("one class")
    if k >= min(int((fold_of != f).sum()) for f in folds):
        base_flags.append(f"k={k} >= the training cells of a fold")
    rows = []
    for name in sets:
        for p in PROBES:
            value = float(np.mean(fold_f1[(name, p)]))
            lo, hi = percentile_ci(boot[(name, p)])
            f = list(base_flags)
            if p == "linear" and name in not_converged:
                f.append(f"logistic regression did not converge in {max_iter} iterations")
            warn_flags(f"cell_probe on {name}: {metric_of[p]}", f)
            rows.append(
                {
                    "feature_set": name,
                    "metric": metric_of[p],
                    "value": value,
                    "chance": float(np.mean(chances)),
                    "ci_low": lo,
                    "ci_high": hi,
                    "p_perm": np.nan,
                    "n_queries": float(len(y)),
                    "flags": join_flags(f),
                }
            )
    summary = pd.DataFrame(rows, columns=["feature_set", "metric", "value", *STAT_COLUMNS])
    paired = []
    if reference in sets:
        for name in sets:
            if name == reference:
                continue
            for p in PROBES:
                d = np.mean(fold_f1[(name, p)]) - np.mean(fold_f1[(reference, p)])
                b = boot[(name, p)]
                lo, hi = percentile_ci(None if b is None else b - boot[(reference, p)])
                paired.append(
                    {
                        "feature_set": name,
                        "reference": reference,
                        "metric": metric_of[p],
                        "difference": float(d),
                        "ci_low": lo,
                        "ci_high": hi,
                        "n_wells": n_units,
                    }
                )
    paired_table = pd.DataFrame(
        paired,
        columns=[
            "feature_set",
            "reference",
            "metric",
            "difference",
            "ci_low",
            "ci_high",
            "n_wells",
        ],
    )
    return summary, fold_table, paired_table
