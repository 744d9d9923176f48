"""Cell-level probes, as DINO and Cell-DINO evaluate: the MoA of single cells, leave one plate out.

Each plate is held out in turn; the probes are fitted on the cells of the other plates and
predict the held-out plate's cells. Two probes, on every feature set, on the same cells; the one
implementation of both, of the per-fold scoring and of the stratified subsample is
`celldino.probes` (`fold_predictions`, `stratified_sample`), shared with train's monitor
(`train.monitor_label`), whose learning curve therefore gives these numbers for the same cells:

- `linear`: scikit-learn's `LogisticRegression` (lbfgs, `class_weight="balanced"` as
  `classify.linear_probe`, fixed `random_state`, `max_iter` 5000) on features z-scored with the
  training plates' mean and standard deviation;
- `knn`: DINO's weighted k-NN (facebookresearch/dino `eval_knn.py`, `knn_classifier`): features
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

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from celldino.eval.classify import encode_labels
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
from celldino.probes import KNN_K, KNN_T, MAX_ITER, PROBES, fold_predictions, probe_folds

logger = get_logger(__name__)

MAX_CELLS = 4000  # cells probed (a stratified subsample of larger screens)
CELL_ID = "Metadata_CellID"
ENGINEERED_PREFIXES = ("Nuclei_", "Cells_", "Cytoplasm_")


# ---- cells ---------------------------------------------------------------------------------------


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
    for name, t in tables.items():  # scored on the common cells only: say what is left out
        if len(t) > len(ids):
            logger.warning(
                "cell_probe: %d of the %d cells of '%s' are missing from another feature set's "
                "per-cell table and are not probed",
                len(t) - len(ids),
                len(t),
                name,
            )
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
    fold_idx, _ = probe_folds(y, fold_of)  # leave-one-group-out, the groups sorted as `folds`
    chances = [f1_chance(y[tr], y[te], n_classes)["chance"] for tr, te in fold_idx]
    preds: dict[str, dict[str, np.ndarray]] = {}
    fold_f1: dict[tuple[str, str], list[float]] = {}
    not_converged = set()
    for name, X in sets.items():
        preds[name], f1, converged = fold_predictions(
            X,
            y,
            fold_idx,
            k=k,
            temperature=temperature,
            knn_zscore=knn_zscore,
            C=C,
            max_iter=max_iter,
            seed=seed,
        )
        fold_f1.update({(name, p): f1[p] for p in PROBES})
        if not converged:
            not_converged.add(name)
    fold_rows = [
        {
            "feature_set": name,
            "metric": metric_of[p],
            "fold": fold,
            "n_train": len(tr),
            "n_test": len(te),
            "n_wells": len(set(unit[te])),
            "macro_f1": fold_f1[(name, p)][i],
            "chance": chances[i],
        }
        for i, (fold, (tr, te)) in enumerate(zip(folds, fold_idx, strict=True))
        for name in sets
        for p in PROBES
    ]
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
