"""Classification and factor analysis speed: celldino vs scikit-learn, same inputs, same numbers.

1. Cosine kNN macro-F1 for k = 1, 5, 10, 20, 50 (the paper's sweep): celldino's `knn_f1` (one
   blockwise neighbour search reused for every k) vs `KNeighborsClassifier(metric="cosine",
   algorithm="brute")` fitted and predicted once per k, as a user of sklearn would.
2. Mutual information of every feature with each factor: `factor_mutual_information` vs a loop of
   `sklearn.metrics.mutual_info_score` over the same quantile bins.

Both sides must give the same numbers (checked); the table prints time and the speed-up.
Run: .venv/bin/python bench/bench_classify.py [--train 20000] [--test 5000] [--dim 384]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score, mutual_info_score
from sklearn.neighbors import KNeighborsClassifier

from celldino.eval.classify import knn_f1
from celldino.eval.factors import discretize, factor_mutual_information

KS = (1, 5, 10, 20, 50)


def data(n: int, d: int, n_classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    centres = rng.normal(size=(n_classes, d)) * 0.15
    X = (rng.normal(size=(n, d)) + centres[y]).astype(np.float32)
    meta = pd.DataFrame(
        {
            "Metadata_Class": [f"c{v:02d}" for v in y],
            "Metadata_Plate": rng.integers(0, 4, n).astype(str),
        }
    )
    return meta, X


def bench_knn(n_train: int, n_test: int, d: int) -> list[dict]:
    meta, X = data(n_train + n_test, d, 12)
    train, test = np.arange(n_train), np.arange(n_train, n_train + n_test)
    t = time.perf_counter()
    ours = knn_f1(meta, X, label="Metadata_Class", ks=KS, train_idx=train, test_idx=test)
    t_ours = time.perf_counter() - t
    y = meta.Metadata_Class.to_numpy()
    t = time.perf_counter()
    ref = []
    for k in KS:
        clf = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute")
        pred = clf.fit(X[train], y[train]).predict(X[test])
        ref.append(f1_score(y[test], pred, average="macro"))
    t_ref = time.perf_counter() - t
    assert np.allclose(ours.macro_f1, ref), (list(ours.macro_f1), ref)
    task = f"kNN k=1..50, {n_train}x{n_test}x{d}"
    return [
        {"task": task, "impl": "sklearn KNeighborsClassifier (per k)", "seconds": t_ref},
        {"task": task, "impl": "celldino knn_f1", "seconds": t_ours},
    ]


def bench_mi(n: int, d: int) -> list[dict]:
    meta, X = data(n, d, 8, seed=1)
    factors = ["Metadata_Class", "Metadata_Plate"]
    t = time.perf_counter()
    table, _ = factor_mutual_information(meta, X, factors=factors)
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    ref = [mutual_info_score(discretize(X[:, j]), meta[f]) for j in range(d) for f in factors]
    t_ref = time.perf_counter() - t
    assert np.allclose(table.mi, ref)
    task = f"MI {n} cells x {d} features x 2 factors"
    return [
        {"task": task, "impl": "sklearn mutual_info_score loop", "seconds": t_ref},
        {"task": task, "impl": "celldino factor_mutual_information", "seconds": t_ours},
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=int, default=20000)
    ap.add_argument("--test", type=int, default=5000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--mi-cells", type=int, default=5000)
    ap.add_argument("--mi-dim", type=int, default=128)
    args = ap.parse_args()
    rows = bench_knn(args.train, args.test, args.dim) + bench_mi(args.mi_cells, args.mi_dim)
    df = pd.DataFrame(rows)
    base = df.groupby("task").seconds.transform("first")
    df["speedup_vs_sklearn"] = base / df.seconds
    print("| task | implementation | seconds | vs sklearn |")
    print("|---|---|---:|---:|")
    for r in df.itertuples():
        print(f"| {r.task} | {r.impl} | {r.seconds:.2f} | {r.speedup_vs_sklearn:.1f}x |")


if __name__ == "__main__":
    main()
