"""Cell-level probes of an embedding: DINO's weighted kNN and a linear classifier, macro-F1.

The one implementation, shared by the training monitor (`train.monitor_label`,
celldino.train.loop) and the evaluation's `cell_probe` analysis (celldino.eval.cell_probe), so
that the monitor's learning curve (step 0 = random init, then each epoch) and the evaluation give
the same numbers for the same cells and folds. It imports nothing from celldino, so both `train`
and `eval` may import it (tests/test_architecture.py). Functions take numpy arrays:

- `labelled_rows(labels, controls)`: the rows a probe scores: a label that is not NA or blank,
  and not a negative control.
- `stratified_sample(strata, cap, seed)`: `cap` rows, each stratum keeping its share (largest
  remainders; every stratum keeps at least one row), deterministic for a seed and a row order.
- `probe_folds(labels, plates, seed)`: leave-one-plate-out when there are at least 2 plates,
  else one fixed 50/50 split stratified by label (the monitor's fallback; `cell_probe` needs
  2 or more groups).
- `knn_predict`: DINO's weighted kNN (facebookresearch/dino `eval_knn.py`): L2-normalised,
  cosine similarity, the k nearest vote with weights exp(sim / T); k=20, T=0.07.
- `linear_predict`: features z-scored with the training rows' mean and std (`zscore_fit`),
  scikit-learn's LogisticRegression (lbfgs, balanced class weights, `max_iter` 5000, fixed
  `random_state`); returns the predictions and whether lbfgs converged.
- `fold_predictions`: both probes on each (train, test) fold, the kNN on the same z-scored
  features as the linear probe by default (`knn_zscore=False`: DINO's raw features), and the
  macro-F1 of each held-out fold.
- `probe_scores`: `probe_folds` + `fold_predictions`, each probe's macro-F1 averaged over the
  folds (as `cell_probe`'s `value`; no intervals: a monitor, not an evaluation).
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "KNN_K",
    "KNN_T",
    "MAX_ITER",
    "fold_predictions",
    "knn_predict",
    "labelled_rows",
    "linear_predict",
    "probe_folds",
    "probe_scores",
    "stratified_sample",
    "zscore_fit",
]

KNN_K = 20  # DINO's default number of neighbours ("20 is usually working the best")
KNN_T = 0.07  # DINO's temperature of the voting weights
MAX_ITER = 5000  # lbfgs iterations of the linear probe
PROBES = ("linear", "knn")


def labelled_rows(labels: Any, controls: Any | None = None) -> np.ndarray:
    """Boolean (n,): rows with a label (not NA, not blank) that are not controls (`controls`:
    a boolean (n,) mask of negative-control rows, or None)."""
    s = pd.Series(np.asarray(labels, dtype=object))
    keep = (s.notna() & (s.astype(str).str.strip() != "")).to_numpy()
    if controls is not None:  # not in place: pandas may hand back a read-only array
        keep = keep & ~np.asarray(controls, dtype=bool)
    return keep


def stratified_sample(strata: Any, cap: int, seed: int = 0) -> np.ndarray:
    """Sorted row indices of `cap` rows (more only when there are more strata than that: every
    stratum keeps at least one row), each stratum keeping its share (largest remainders).
    Deterministic for a seed and a row order."""
    keys = np.asarray(strata, dtype=object).astype(str)
    n = len(keys)
    if n <= cap:
        return np.arange(n)
    names, codes = np.unique(keys, return_inverse=True)
    size = np.bincount(codes, minlength=len(names))
    quota = size * cap / n
    take = np.maximum(np.floor(quota).astype(np.int64), 1)
    left = cap - int(take.sum())
    order = np.argsort(-(quota - np.floor(quota)), kind="stable")
    while left > 0:  # the largest remainders get one more, among the strata with rows left
        for c in order:  # (n > cap: there is room for every leftover row)
            if left > 0 and take[c] < size[c]:
                take[c] += 1
                left -= 1
    for c in np.argsort(-take, kind="stable"):  # one-row minimums overshot: the largest give back
        if left >= 0:
            break
        give = min(-left, int(take[c]) - 1)
        take[c] -= give
        left += give
    rng = np.random.default_rng([int(seed), zlib.crc32(b"cell_probe_subsample")])
    picked = [
        rng.choice(np.flatnonzero(codes == c), size=int(min(take[c], size[c])), replace=False)
        for c in range(len(names))
    ]
    return np.sort(np.concatenate(picked))


def probe_folds(
    labels: Any, plates: Any | None = None, seed: int = 0
) -> tuple[list[tuple[np.ndarray, np.ndarray]], str]:
    """[(train rows, test rows)] and the split's name: leave-one-plate-out with >= 2 plates (in
    sorted plate order), else one 50/50 split in which each label's rows are halved at random
    (fixed by `seed`)."""
    y = np.asarray(labels, dtype=object).astype(str)
    if plates is not None:
        p = np.asarray(plates, dtype=object).astype(str)
        names = np.unique(p)
        if len(names) >= 2:
            return [(np.flatnonzero(p != q), np.flatnonzero(p == q)) for q in names], (
                "leave-one-plate-out"
            )
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), dtype=bool)
    for label in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == label))
        test[rows[: len(rows) // 2]] = True
    return [(np.flatnonzero(~test), np.flatnonzero(test))], "half"


def zscore_fit(X_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of the training rows (std 0 → 1 so constant features stay finite)."""
    mean = X_train.mean(axis=0)
    std = X_train.std(axis=0)
    std[std == 0] = 1.0
    return mean, std


def _unit(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def knn_predict(
    X_train: np.ndarray,
    y_train: Any,
    X_test: np.ndarray,
    *,
    k: int = KNN_K,
    temperature: float = KNN_T,
) -> np.ndarray:
    """DINO's weighted kNN: each of the k most cosine-similar training cells votes for its label
    with weight exp(similarity / temperature); the label with the largest vote wins. Labels:
    names or class codes, returned as given."""
    classes, code = np.unique(np.asarray(y_train), return_inverse=True)
    k = min(k, len(code))
    sim = _unit(X_test) @ _unit(X_train).T  # (n_test, n_train)
    top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    w = np.exp(np.take_along_axis(sim, top, axis=1) / temperature)  # (n_test, k)
    votes = np.zeros((len(sim), len(classes)))
    np.add.at(votes, (np.repeat(np.arange(len(sim)), k), code[top].ravel()), w.ravel())
    return classes[votes.argmax(1)]


def linear_predict(
    X_train: np.ndarray,
    y_train: Any,
    X_test: np.ndarray,
    *,
    C: float = 1.0,
    max_iter: int = MAX_ITER,
    seed: int = 0,
) -> tuple[np.ndarray, bool]:
    """Logistic regression (lbfgs, balanced class weights) on features z-scored with the training
    rows' mean and std: (labels of the test rows, whether lbfgs converged). One training class:
    that class for every row."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    y_train = np.asarray(y_train)
    if len(np.unique(y_train)) < 2:
        return np.full(len(X_test), y_train[0], dtype=y_train.dtype), True
    X_train = np.asarray(X_train, dtype=np.float64)
    mean, std = zscore_fit(X_train)
    clf = LogisticRegression(C=C, max_iter=max_iter, class_weight="balanced", random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit((X_train - mean) / std, y_train)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return clf.predict((np.asarray(X_test, dtype=np.float64) - mean) / std), converged


def fold_predictions(
    X: np.ndarray,
    y: Any,
    folds: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    k: int = KNN_K,
    temperature: float = KNN_T,
    knn_zscore: bool = True,
    C: float = 1.0,
    max_iter: int = MAX_ITER,
    seed: int = 0,
) -> tuple[dict[str, np.ndarray], dict[str, list[float]], bool]:
    """Both probes fitted on each fold's training rows, predicting its test rows:
    ({"linear", "knn"}: (n,) predictions of the held-out rows, {"linear", "knn"}: sklearn's
    macro-F1 of each fold in order, whether every linear fit converged). The kNN sees the
    features z-scored with the fold's training rows (as the linear probe) when `knn_zscore`."""
    from sklearn.metrics import f1_score

    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y)
    preds = {p: np.empty_like(y) for p in PROBES}
    f1: dict[str, list[float]] = {p: [] for p in PROBES}
    converged = True
    for train, test in folds:
        pl, ok = linear_predict(X[train], y[train], X[test], C=C, max_iter=max_iter, seed=seed)
        converged &= ok
        K = X
        if knn_zscore:
            mean, std = zscore_fit(X[train])
            K = (X - mean) / std
        pk = knn_predict(K[train], y[train], K[test], k=k, temperature=temperature)
        preds["linear"][test], preds["knn"][test] = pl, pk
        for p in PROBES:
            f1[p].append(float(f1_score(y[test], preds[p][test], average="macro")))
    return preds, f1, bool(converged)


def probe_scores(
    X: np.ndarray,
    labels: Any,
    plates: Any | None = None,
    *,
    seed: int = 0,
    **settings: Any,
) -> dict[str, Any]:
    """kNN and linear macro-F1 of each held-out fold (`probe_folds`) averaged over the folds, as
    `celldino.eval.cell_probe` scores; `settings`: those of `fold_predictions` (k, temperature,
    knn_zscore, C, max_iter). {"knn<k>_f1", "linear_f1", "linear_converged", "n_cells",
    "n_labels", "split"}."""
    y = np.asarray(labels, dtype=object).astype(str)
    folds, split = probe_folds(y, plates, seed)
    _, f1, converged = fold_predictions(X, y, folds, seed=seed, **settings)
    return {
        f"knn{int(settings.get('k', KNN_K))}_f1": float(np.mean(f1["knn"])),
        "linear_f1": float(np.mean(f1["linear"])),
        "linear_converged": converged,
        "n_cells": int(sum(len(te) for _, te in folds)),
        "n_labels": int(len(np.unique(y))),
        "split": split,
    }
