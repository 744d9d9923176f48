"""Cell-level probes of an embedding: DINO's weighted kNN and a linear classifier, macro-F1.

Shared by the training monitor (`train.monitor_label`, celldino.train.loop) and the evaluation;
it imports nothing from celldino, so both `train` and `eval` may import it (tests/
test_architecture.py). Functions take numpy arrays:

- `stratified_sample(strata, cap, seed)`: a deterministic sample of at most `cap` rows, each
  stratum (e.g. plate x label) represented in proportion to its size.
- `probe_folds(labels, plates, seed)`: leave-one-plate-out when there are at least 2 plates,
  else one fixed 50/50 split stratified by label.
- `knn_predict` (L2-normalised, cosine similarity, the k nearest vote with weights
  exp(sim / T): k=20, T=0.07 as DINO's evaluation) and `linear_predict` (standardised features,
  sklearn LogisticRegression with balanced class weights, as `celldino.eval.cell_probe`).
- `probe_scores`: both probes' macro-F1 of each held-out fold, averaged over the folds (as
  `celldino.eval.cell_probe` scores; no intervals: a monitor, not an evaluation).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "knn_predict",
    "linear_predict",
    "probe_folds",
    "probe_scores",
    "stratified_sample",
]


def stratified_sample(strata: Any, cap: int, seed: int = 0) -> np.ndarray:
    """Sorted row indices of at most `cap` rows, the strata in proportion to their sizes.

    Each row gets its random rank within its stratum as a fraction of the stratum's size; the
    `cap` smallest fractions are kept, so every stratum gives about cap x size / n rows (a
    stratum of any size gets at least its first row when cap >= number of strata).
    """
    keys = np.asarray(strata, dtype=object).astype(str)
    n = len(keys)
    if cap >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    _, code = np.unique(keys, return_inverse=True)
    order = rng.permutation(n)
    frac = np.empty(n)
    sizes = np.bincount(code)
    seen = np.zeros(len(sizes), dtype=int)
    for i in order:  # rank within the stratum, in random order
        c = code[i]
        frac[i] = seen[c] / sizes[c]
        seen[c] += 1
    tie = rng.random(n) * 1e-9  # equal fractions: random order, still deterministic
    return np.sort(np.argsort(frac + tie, kind="stable")[:cap])


def probe_folds(
    labels: Any, plates: Any | None = None, seed: int = 0
) -> tuple[list[tuple[np.ndarray, np.ndarray]], str]:
    """[(train rows, test rows)] and the split's name: leave-one-plate-out with >= 2 plates,
    else one 50/50 split in which each label's rows are halved at random (fixed by `seed`)."""
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


def _unit(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def knn_predict(
    X_train: np.ndarray,
    y_train: Any,
    X_test: np.ndarray,
    *,
    k: int = 20,
    temperature: float = 0.07,
) -> np.ndarray:
    """DINO's weighted kNN: each of the k most cosine-similar training cells votes for its label
    with weight exp(similarity / temperature); the label with the largest vote wins."""
    y_train = np.asarray(y_train, dtype=object).astype(str)
    classes, code = np.unique(y_train, return_inverse=True)
    k = min(k, len(y_train))
    sim = _unit(X_test) @ _unit(X_train).T  # (n_test, n_train)
    top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    w = np.exp(np.take_along_axis(sim, top, axis=1) / temperature)  # (n_test, k)
    votes = np.zeros((len(sim), len(classes)))
    np.add.at(votes, (np.repeat(np.arange(len(sim)), k), code[top].ravel()), w.ravel())
    return classes[votes.argmax(1)]


def linear_predict(X_train: np.ndarray, y_train: Any, X_test: np.ndarray) -> np.ndarray:
    """Logistic regression (balanced class weights) on features standardised with the training
    rows' mean and std."""
    from sklearn.linear_model import LogisticRegression

    y_train = np.asarray(y_train, dtype=object).astype(str)
    if len(np.unique(y_train)) < 2:
        return np.full(len(X_test), y_train[0], dtype=object)
    mu = X_train.mean(0)
    sd = X_train.std(0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    clf = LogisticRegression(max_iter=1000, class_weight="balanced")
    clf.fit((X_train - mu) / sd, y_train)
    return clf.predict((X_test - mu) / sd).astype(object)


def probe_scores(
    X: np.ndarray,
    labels: Any,
    plates: Any | None = None,
    *,
    k: int = 20,
    temperature: float = 0.07,
    seed: int = 0,
) -> dict[str, Any]:
    """kNN and linear macro-F1 of each held-out fold averaged over the folds:
    {"knn20_f1", "linear_f1", "n_cells", "n_labels", "split"}."""
    from sklearn.metrics import f1_score

    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(labels, dtype=object).astype(str)
    folds, split = probe_folds(y, plates, seed)
    knn, lin = [], []
    for tr, te in folds:
        pk = knn_predict(X[tr], y[tr], X[te], k=k, temperature=temperature)
        knn.append(f1_score(y[te], pk.astype(str), average="macro"))
        lin.append(
            f1_score(y[te], linear_predict(X[tr], y[tr], X[te]).astype(str), average="macro")
        )
    return {
        "knn20_f1" if k == 20 else f"knn{k}_f1": float(np.mean(knn)),
        "linear_f1": float(np.mean(lin)),
        "n_cells": int(sum(len(te) for _, te in folds)),
        "n_labels": int(len(np.unique(y))),
        "split": split,
    }
