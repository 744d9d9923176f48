"""Classifiers on real single-cell crops (BBBC021 subset), split by plate."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score
from sklearn.neighbors import KNeighborsClassifier

from celldino.eval.classify import knn_f1, linear_probe
from celldino.eval.splits import group_split

HONEST_PLATES = ["Week4_27801", "Week4_27821", "Week4_27861"]  # both labels on each plate


def intensity_features(images: np.ndarray) -> np.ndarray:
    """Per-channel log mean, std and 90th percentile of each crop: (N, 9)."""
    x = np.log1p(images.astype(np.float64))  # (N, H, W, C)
    return np.concatenate(
        [x.mean(axis=(1, 2)), x.std(axis=(1, 2)), np.percentile(x, 90, axis=(1, 2))], axis=1
    ).astype(np.float32)


def test_knn_and_linear_on_bbbc021_split_by_plate(bbbc021_dir):
    meta = pd.read_csv(bbbc021_dir / "metadata_mini.csv")
    images = np.load(bbbc021_dir / "crops_mini.npz")["images"]
    keep = meta.plate.isin(HONEST_PLATES).to_numpy()
    meta, X = meta[keep].reset_index(drop=True), intensity_features(images[keep])
    train, test = group_split(meta, by="plate", test_size=0.34, seed=0)
    assert set(meta.plate[train]).isdisjoint(meta.plate[test])
    knn = knn_f1(meta, X, label="moa", train_idx=train, test_idx=test, ks=(5, 20))
    y = meta.moa.to_numpy()
    for k, ours in zip(knn.k, knn.macro_f1):
        ref = KNeighborsClassifier(n_neighbors=int(k), metric="cosine", algorithm="brute")
        pred = ref.fit(X[train], y[train]).predict(X[test])
        assert ours == pytest.approx(f1_score(y[test], pred, average="macro"))
    lin = linear_probe(meta, X, label="moa", train_idx=train, test_idx=test)
    # the two-class task is easy (README: ~0.95 with intensity statistics)
    assert lin.macro_f1.iloc[0] > 0.8
