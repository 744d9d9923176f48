"""Classifiers, splits and low-shot curves against scikit-learn and planted ground truth."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler

from celldino.eval.classify import (
    MLPClassifier,
    MLPOptions,
    block_search,
    classify,
    encode_multilabel,
    knn_f1,
    linear_probe,
    mlp_f1,
    sample_weights,
)
from celldino.eval.lowshot import lowshot_curve, subsample_per_class
from celldino.eval.splits import check_no_leakage, group_folds, group_split, split_table


def planted(n_plates=4, wells=6, cells=10, n_classes=3, d=16, signal=2.0, seed=0):
    """Cells in wells on plates; the class shifts the first features, plates add an offset."""
    rng = np.random.default_rng(seed)
    rows, feats = [], []
    for p in range(n_plates):
        plate_shift = rng.normal(0, 0.3, d)
        for w in range(wells):
            c = (p * wells + w) % n_classes
            for _ in range(cells):
                x = rng.normal(0, 1, d) + plate_shift
                x[c] += signal
                feats.append(x)
                rows.append(
                    {
                        "Metadata_Plate": f"P{p}",
                        "Metadata_Well": f"W{w:02d}",
                        "Metadata_Class": f"class_{c}",
                    }
                )
    return pd.DataFrame(rows), np.asarray(feats, dtype=np.float32)


# ---- splits ----------------------------------------------------------------------------------


def test_group_split_keeps_groups_whole_and_is_seeded():
    meta, _ = planted()
    train, test = group_split(meta, by="Metadata_Plate", test_size=0.25, seed=3)
    assert set(meta.Metadata_Plate[train]).isdisjoint(meta.Metadata_Plate[test])
    assert len(train) + len(test) == len(meta)
    again = group_split(meta, by="Metadata_Plate", test_size=0.25, seed=3)
    assert np.array_equal(train, again[0])
    # wells are only unique within a plate: the split must group by plate+well
    tr, te = group_split(meta, by=["Metadata_Plate", "Metadata_Well"], seed=1)
    key = meta.Metadata_Plate + "/" + meta.Metadata_Well
    assert set(key[tr]).isdisjoint(key[te])
    with pytest.raises(ValueError, match="leaks"):
        check_no_leakage(meta, np.arange(0, 100), np.arange(50, 150), by="Metadata_Plate")
    table = split_table(meta, train, test, by="Metadata_Plate", seed=3)
    assert (table.seed == 3).all() and set(table.split) == {"train", "test"}


def test_group_folds_cover_every_row_once():
    meta, _ = planted()
    folds = group_folds(meta, by="Metadata_Plate", n_splits=None, seed=0)
    assert len(folds) == 4
    tests = np.concatenate([te for _, te in folds])
    assert np.array_equal(np.sort(tests), np.arange(len(meta)))


def test_split_needs_a_group_column():
    meta, X = planted()
    with pytest.raises(ValueError, match="split_by"):
        knn_f1(meta, X, label="Metadata_Class")
    with pytest.raises(KeyError, match="Metadata_Nope"):
        knn_f1(meta, X, label="Metadata_Class", split_by="Metadata_Nope")


# ---- kNN -------------------------------------------------------------------------------------


def test_knn_matches_sklearn_cosine_knn():
    meta, X = planted(signal=0.8, seed=1)  # weak signal: errors and ties in votes happen
    train, test = group_split(meta, by="Metadata_Plate", seed=0)
    table = knn_f1(meta, X, label="Metadata_Class", train_idx=train, test_idx=test)
    y = meta.Metadata_Class.to_numpy()
    assert list(table.k) == [1, 5, 10, 20, 50]
    for k, ours in zip(table.k, table.macro_f1):
        ref = KNeighborsClassifier(n_neighbors=int(k), metric="cosine", algorithm="brute")
        pred = ref.fit(X[train], y[train]).predict(X[test])
        assert ours == pytest.approx(f1_score(y[test], pred, average="macro"), abs=1e-12)
    assert table.macro_f1.max() < 1.0  # the check above compared non-trivial predictions


def test_knn_recovers_planted_classes_and_not_noise():
    meta, X = planted(signal=3.0)
    table = knn_f1(meta, X, label="Metadata_Class", split_by="Metadata_Plate", ks=(5,))
    assert table.macro_f1.iloc[0] > 0.9
    noise = np.random.default_rng(0).normal(size=X.shape).astype(np.float32)
    table = knn_f1(meta, noise, label="Metadata_Class", split_by="Metadata_Plate", ks=(5,))
    assert table.macro_f1.iloc[0] < 0.6


# ---- linear probe ----------------------------------------------------------------------------


def test_linear_probe_matches_sklearn_with_training_zscore():
    meta, X = planted(signal=1.0, seed=2)
    X = X * np.linspace(0.1, 50, X.shape[1]).astype(np.float32)  # very different scales
    train, test = group_split(meta, by="Metadata_Plate", seed=1)
    ours = linear_probe(meta, X, label="Metadata_Class", train_idx=train, test_idx=test)
    y = meta.Metadata_Class.to_numpy()
    scaler = StandardScaler().fit(X[train])
    clf = LogisticRegression(max_iter=2000, class_weight="balanced")
    pred = clf.fit(scaler.transform(X[train]), y[train]).predict(scaler.transform(X[test]))
    assert ours.macro_f1.iloc[0] == pytest.approx(
        f1_score(y[test], pred, average="macro"), abs=1e-6
    )


# ---- MLP -------------------------------------------------------------------------------------


def test_mlp_architecture_is_the_papers():
    model = MLPClassifier(384, 7)
    linears = [m for m in model.modules() if isinstance(m, __import__("torch").nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(384, 512), (512, 256), (256, 7)]
    drops = [m.p for m in model.modules() if isinstance(m, __import__("torch").nn.Dropout)]
    assert drops == [0.5, 0.5]


def test_sample_weights_inverse_to_frequency():
    y = np.array([0, 0, 0, 1])
    w = sample_weights(y)
    assert w[0] == pytest.approx(1 / 3) and w[3] == pytest.approx(1.0)
    # each class gets the same total weight → balanced draws
    assert w[y == 0].sum() == pytest.approx(w[y == 1].sum())
    Y = np.array([[1, 0], [1, 0], [1, 1], [0, 0]], dtype=np.float32)
    assert sample_weights(Y).tolist() == pytest.approx([1 / 3, 1 / 3, 1.0, 1.0])


def test_mlp_learns_planted_classes_and_is_reproducible():
    meta, X = planted(signal=3.0, cells=6)
    opts = MLPOptions(epochs=8, batch_size=32, hidden=(64, 32), lr=1e-2)
    a = mlp_f1(meta, X, label="Metadata_Class", split_by="Metadata_Plate", options=opts)
    b = mlp_f1(meta, X, label="Metadata_Class", split_by="Metadata_Plate", options=opts)
    assert a.macro_f1.iloc[0] > 0.85
    assert a.macro_f1.iloc[0] == b.macro_f1.iloc[0]


def test_mlp_multilabel_with_bce():
    rng = np.random.default_rng(0)
    n, d = 240, 12
    Y = (rng.random((n, 3)) < 0.4).astype(int)
    X = rng.normal(size=(n, d)).astype(np.float32)
    X[:, :3] += 3.0 * Y
    labels = ["|".join(f"L{j}" for j in range(3) if Y[i, j]) for i in range(n)]
    meta = pd.DataFrame({"Metadata_Loc": labels, "Metadata_Plate": [f"P{i % 4}" for i in range(n)]})
    Yenc, classes = encode_multilabel(meta, "Metadata_Loc")
    assert classes.tolist() == ["L0", "L1", "L2"] and np.array_equal(Yenc, Y)
    t = mlp_f1(
        meta,
        X,
        label="Metadata_Loc",
        multilabel=True,
        split_by="Metadata_Plate",
        options=MLPOptions(epochs=20, batch_size=32, hidden=(64, 32), lr=1e-2),
    )
    assert t.classifier.iloc[0] == "mlp_multilabel" and t.macro_f1.iloc[0] > 0.8


def test_classify_runs_all_on_one_split():
    meta, X = planted(signal=3.0, cells=5)
    t = classify(
        meta,
        X,
        label="Metadata_Class",
        split_by="Metadata_Plate",
        ks=(1, 5),
        mlp_options=MLPOptions(epochs=5, batch_size=32),
    )
    assert list(t.classifier) == ["knn", "knn", "linear", "mlp"]
    assert t.n_test.nunique() == 1 and (t.seed == 0).all()
    assert t.macro_f1.min() > 0.8


# ---- block search ----------------------------------------------------------------------------


def test_block_search_finds_the_informative_block_per_task():
    meta, X = planted(signal=3.0)
    rng = np.random.default_rng(5)
    meta["Metadata_Other"] = np.where(rng.random(len(meta)) < 0.5, "a", "b")
    other = rng.normal(size=X.shape).astype(np.float32)
    other[:, 0] += 4.0 * (meta.Metadata_Other == "a").to_numpy()
    noise = rng.normal(size=X.shape).astype(np.float32)
    blocks = {"block_0": noise, "block_1": X, "block_2": other}
    table, best = block_search(
        meta, blocks, labels=["Metadata_Class", "Metadata_Other"], split_by="Metadata_Plate", k=5
    )
    assert best["Metadata_Class"]["best_block"] == "block_1"
    assert best["Metadata_Other"]["best_block"] == "block_2"
    assert len(table) == 6 and table.is_best.sum() == 2


# ---- low-shot --------------------------------------------------------------------------------


def test_subsample_per_class_keeps_every_class_and_fraction():
    y = np.array([0] * 90 + [1] * 10)
    idx = np.arange(100, 200)
    sub = subsample_per_class(idx, y, fraction=0.1, seed=0)
    assert set(sub) <= set(idx)
    assert np.sum(y[sub - 100] == 0) == 9 and np.sum(y[sub - 100] == 1) == 1
    tiny = subsample_per_class(idx, y, fraction=0.01, seed=0)
    assert set(y[tiny - 100]) == {0, 1}  # at least one per class


def test_lowshot_curve_full_fraction_equals_direct_call():
    meta, X = planted(signal=1.5, cells=8)
    curve = lowshot_curve(
        meta,
        X,
        label="Metadata_Class",
        split_by="Metadata_Plate",
        classifiers=("knn", "linear"),
        ks=(5,),
        seed=0,
    )
    assert sorted(curve.fraction.unique()) == [0.01, 0.02, 0.05, 0.1, 0.25, 1.0]
    train, test = group_split(meta, by="Metadata_Plate", seed=0)
    full = curve[(curve.fraction == 1.0) & (curve.classifier == "knn")]
    direct = knn_f1(meta, X, label="Metadata_Class", ks=(5,), train_idx=train, test_idx=test)
    assert full.macro_f1.iloc[0] == pytest.approx(direct.macro_f1.iloc[0])
    # n_train grows with the fraction and the test set never changes
    knn = curve[curve.classifier == "knn"].sort_values("fraction")
    assert knn.n_train.is_monotonic_increasing and knn.n_test.nunique() == 1
    assert knn.macro_f1.iloc[-1] >= knn.macro_f1.iloc[0]
