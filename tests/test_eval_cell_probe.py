"""The cell-level probes (eval/cell_probe.py, runner analysis `cell_probe`), each against an
independent computation: DINO's weighted k-NN by hand and by brute force, the linear probe by
scikit-learn's LeaveOneGroupOut, the well bootstrap, and cells matched across feature sets."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.dummy import DummyClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.model_selection import LeaveOneGroupOut
from sklearn.preprocessing import StandardScaler

from celldino.config import EvaluateConfig
from celldino.eval import runner
from celldino.eval.cell_probe import cell_probe, well_bootstrap
from celldino.probes import knn_predict, probe_scores
from celldino.probes import stratified_sample as stratified_subsample


def weighted_knn_predict(X_train, y_train, X_test, *, n_classes, k=20, temperature=0.07):
    """The k-NN cell_probe uses (celldino.probes.knn_predict), on class codes."""
    pred = knn_predict(X_train, y_train, X_test, k=k, temperature=temperature)
    return pred.astype(int)


def _cells(seed: int = 0, n_plates: int = 3, wells: int = 4, per_well: int = 6, d: int = 8):
    """3 MoAs, each in `wells` wells per plate, `per_well` cells per well; features = MoA centre
    + a well offset + noise (cells of a well are alike, as in a screen)."""
    rng = np.random.default_rng(seed)
    centres = 1.5 * rng.normal(size=(3, d))
    rows, X = [], []
    for p in range(n_plates):
        for m in range(3):
            for w in range(wells):
                off = 0.8 * rng.normal(size=d)
                for c in range(per_well):
                    rows.append((f"P{p}", f"W{m}{w}", f"M{m}", f"P{p}/W{m}{w}/{c}"))
                    X.append(centres[m] + off + rng.normal(size=d))
    meta = pd.DataFrame(
        rows, columns=["Metadata_Plate", "Metadata_Well", "Metadata_MoA", "Metadata_CellID"]
    )
    return meta, np.array(X)


# ---- DINO's weighted k-NN ------------------------------------------------------------------------


def test_weighted_knn_by_hand_beats_the_plain_majority():
    """One very close neighbour of class 0 against two farther ones of class 1: a uniform 3-NN
    vote says 1; DINO's weights exp(sim / 0.07) say 0 (e^(1/0.07) ≫ 2 e^(0.5/0.07))."""
    ang = np.deg2rad([0.0, 60.0, 61.0, 150.0])
    X_train = np.c_[np.cos(ang), np.sin(ang)] * np.array([[1], [3], [0.5], [2]])  # norms differ
    y_train = np.array([0, 1, 1, 0])
    X_test = np.array([[1.0, 0.0]])
    sim = np.cos(ang[:3])
    assert np.exp(sim[0] / 0.07) > np.exp(sim[1] / 0.07) + np.exp(sim[2] / 0.07)
    assert weighted_knn_predict(X_train, y_train, X_test, n_classes=2, k=3)[0] == 0
    # with a temperature so high that the weights are nearly equal, the two class-1 cells win
    assert weighted_knn_predict(X_train, y_train, X_test, n_classes=2, k=3, temperature=1e6)[0] == 1


def test_weighted_knn_matches_a_brute_force_loop():
    rng = np.random.default_rng(1)
    X_train, X_test = rng.normal(size=(60, 5)), rng.normal(size=(25, 5))
    y_train = rng.integers(0, 4, size=60)
    got = weighted_knn_predict(X_train, y_train, X_test, n_classes=4, k=20)
    want = []
    for x in X_test:  # one test cell at a time: full sort, then the weighted vote
        sim = np.array([x @ t / np.linalg.norm(x) / np.linalg.norm(t) for t in X_train])
        nn = np.argsort(-sim)[:20]
        votes = [sum(np.exp(sim[j] / 0.07) for j in nn if y_train[j] == c) for c in range(4)]
        want.append(int(np.argmax(votes)))
    assert got.tolist() == want


# ---- leave one plate out -------------------------------------------------------------------------


def test_linear_probe_and_knn_match_leave_one_group_out_by_hand():
    meta, X = _cells()
    summary, folds, _ = cell_probe(
        meta, {"learned": X}, label="Metadata_MoA", split_by="Metadata_Plate", n_boot=0
    )
    y = meta.Metadata_MoA.to_numpy()
    lin, knn, chance = [], [], []
    for tr, te in LeaveOneGroupOut().split(X, y, meta.Metadata_Plate):
        sc = StandardScaler().fit(X[tr])
        clf = LogisticRegression(class_weight="balanced", max_iter=5000, random_state=0)
        clf.fit(sc.transform(X[tr]), y[tr])
        lin.append(f1_score(y[te], clf.predict(sc.transform(X[te])), average="macro"))
        Z_tr, Z_te = sc.transform(X[tr]), sc.transform(X[te])
        Z_tr /= np.linalg.norm(Z_tr, axis=1, keepdims=True)
        Z_te /= np.linalg.norm(Z_te, axis=1, keepdims=True)
        sim = Z_te @ Z_tr.T
        pred = []
        for row in sim:
            nn = np.argsort(-row)[:20]
            w = pd.Series(np.exp(row[nn] / 0.07)).groupby(y[tr][nn]).sum()
            pred.append(w.idxmax())
        knn.append(f1_score(y[te], pred, average="macro"))
        dummy = DummyClassifier(strategy="most_frequent").fit(X[tr], y[tr])
        chance.append(f1_score(y[te], dummy.predict(X[te]), average="macro"))
    value = summary.set_index("metric")["value"]
    assert value["linear_f1"] == pytest.approx(np.mean(lin), abs=1e-12)
    assert value["knn20_f1"] == pytest.approx(np.mean(knn), abs=1e-12)
    per_fold = folds[folds.metric == "linear_f1"].sort_values("fold")["macro_f1"].to_numpy()
    assert per_fold == pytest.approx(lin, abs=1e-12)  # one row per held-out plate
    # chance: at least the always-the-majority classifier's macro-F1, far below the probes
    row = summary.set_index("metric").loc["linear_f1"]
    assert row.chance >= np.mean(chance) - 1e-12 and row.chance < 0.5 < row.value
    assert row.n_queries == len(meta)


def test_train_monitor_scores_as_cell_probe():
    """train's monitor (celldino.probes.probe_scores) on the same cells and plates gives exactly
    cell_probe's values: same z-scoring (both probes), folds, fit and fold averaging."""
    meta, X = _cells(seed=2)
    X = X * np.linspace(0.1, 100, X.shape[1])  # scales apart: z-scoring before the kNN matters
    for knn_zscore in (True, False):
        summary, _, _ = cell_probe(
            meta,
            {"learned": X},
            label="Metadata_MoA",
            split_by="Metadata_Plate",
            knn_zscore=knn_zscore,
            n_boot=0,
        )
        value = summary.set_index("metric")["value"]
        got = probe_scores(X, meta.Metadata_MoA, meta.Metadata_Plate, knn_zscore=knn_zscore)
        assert got["split"] == "leave-one-plate-out" and got["n_cells"] == len(meta)
        assert got["linear_f1"] == value["linear_f1"]
        assert got["knn20_f1"] == value["knn20_f1"]


def test_the_interval_redraws_wells_not_cells():
    """Predictions fixed, every cell copied ten times inside its well: the well bootstrap draws
    the same wells with the same cells and gives the same replicates; a bootstrap of cells
    (each cell its own unit) narrows ~3× on the copies, as if there were ten times more data."""
    rng = np.random.default_rng(0)
    n_wells, per_well = 24, 4
    well = np.repeat([f"W{i}" for i in range(n_wells)], per_well)
    fold = np.where(np.arange(len(well)) < len(well) // 2, "P0", "P1")
    y = np.repeat(rng.integers(0, 3, n_wells), per_well)
    pred = np.where(rng.random(len(y)) < 0.6, y, rng.integers(0, 3, len(y)))
    kw = dict(n_classes=3, n_boot=400, seed=0)
    one = well_bootstrap(y, {"p": pred}, fold, well, **kw)["p"]
    rep = np.repeat(np.arange(len(y)), 10)
    ten = well_bootstrap(y[rep], {"p": pred[rep]}, fold[rep], well[rep], **kw)["p"]
    assert one == pytest.approx(ten, abs=1e-12)
    # each replicate is the fold average of the macro-F1 of some redrawn wells
    per_fold = [f1_score(y[fold == f], pred[fold == f], average="macro") for f in ("P0", "P1")]
    assert np.percentile(one, 2.5) < np.mean(per_fold) < np.percentile(one, 97.5)
    cells = np.arange(len(y)).astype(str)
    c1 = well_bootstrap(y, {"p": pred}, fold, cells, **kw)["p"]
    c10 = well_bootstrap(
        y[rep],
        {"p": pred[rep]},
        fold[rep],
        np.repeat(cells, 10) + "_" + np.tile(np.arange(10).astype(str), len(y)),
        **kw,
    )["p"]
    assert np.std(c10) < 0.5 * np.std(c1)


def test_paired_difference_uses_the_same_draws():
    meta, X = _cells(seed=3)
    noise = np.random.default_rng(5).normal(size=X.shape)
    sets = {"learned": X, "random_init": noise, "copy": noise.copy()}
    s, _, paired = cell_probe(
        meta, sets, label="Metadata_MoA", split_by="Metadata_Plate", well="Metadata_Well"
    )
    p = paired.set_index(["feature_set", "metric"])
    # a copy of the reference differs by exactly 0 in every draw
    assert p.loc[("copy", "linear_f1"), ["difference", "ci_low", "ci_high"]].tolist() == [0, 0, 0]
    v = s.set_index(["feature_set", "metric"])["value"]
    d = p.loc[("learned", "linear_f1")]
    assert d.difference == pytest.approx(
        v[("learned", "linear_f1")] - v[("random_init", "linear_f1")]
    )
    assert 0 < d.ci_low <= d.difference <= d.ci_high
    assert "random_init" not in set(paired.feature_set)


def test_stratified_subsample_keeps_each_label_share_and_is_deterministic():
    labels = np.array(["a"] * 600 + ["b"] * 300 + ["c"] * 100)
    idx = stratified_subsample(labels, 100, seed=0)
    assert len(idx) == 100 and np.all(np.diff(idx) > 0)
    assert pd.Series(labels[idx]).value_counts().to_dict() == {"a": 60, "b": 30, "c": 10}
    assert idx.tolist() == stratified_subsample(labels, 100, seed=0).tolist()
    assert len(stratified_subsample(labels, 5000, seed=0)) == 1000


# ---- through the runner, from a run folder -------------------------------------------------------


def _run_folder(root, order_random=None):
    """A `celldino run` folder with per-cell learned / random_init embeddings and engineered
    features of the same cells (8 of them controls), and well profiles of learned."""
    from celldino.io.embeddings import shard_name, write_manifest, write_shard

    meta, X = _cells(seed=4)
    ctrl = meta.index < 8
    meta = meta.assign(Metadata_pert_type=np.where(ctrl, "control", "trt"))
    meta.loc[ctrl, "Metadata_MoA"] = "DMSO"
    (root / "prep").mkdir(parents=True)
    meta.to_parquet(root / "prep" / "cells.parquet")
    rng = np.random.default_rng(9)
    embs = {"learned": X, "random_init": rng.normal(size=X.shape)}
    for name, E in embs.items():
        order = np.arange(len(meta))
        if name == "random_init" and order_random is not None:
            order = order_random
        folder = root / "embeddings" / name
        folder.mkdir(parents=True)
        write_shard(folder / shard_name(0), meta.iloc[order], E[order])
        write_manifest(folder, {"shards": [shard_name(0)], "complete": True})
    eng = pd.DataFrame(
        X[:, :3] + rng.normal(size=(len(X), 3)), columns=["Cells_A", "Cells_B", "Nuclei_C"]
    )
    eng["Cytoplasm_Bad"] = np.nan  # a non-finite column is dropped, not fatal
    pd.concat([meta, eng], axis=1).iloc[::-1].to_parquet(root / "prep" / "engineered.parquet")
    (root / "profiles").mkdir()
    wells = meta.groupby(["Metadata_Plate", "Metadata_Well"], as_index=False).first()
    prof = wells.drop(columns="Metadata_CellID").assign(
        f0=1.0, f1=np.arange(len(wells), dtype=float)
    )
    inputs = {}
    for name in ("learned", "random_init", "engineered"):
        prof.to_parquet(root / "profiles" / f"{name}.parquet")
        inputs[name] = str(root / "profiles" / f"{name}.parquet")
    return meta, inputs


def _evaluate(inputs, out, **params):
    out = runner.evaluate(
        None,
        spec={
            "inputs": inputs,
            "derived": {"pca_engineered": {"pca": "engineered", "n_components": 2}},
            "analyses": {"cell_probe": params},
        },
        cfg=EvaluateConfig(out_dir=str(out), n_boot=200),
    )
    return pd.read_parquet(out / "metrics.parquet"), out


def test_cell_probe_reads_the_run_folder_and_aligns_cells(tmp_path):
    meta, inputs = _run_folder(tmp_path / "a")
    tidy, out = _evaluate(inputs, tmp_path / "eval_a")
    got = tidy.set_index(["feature_set", "metric"])
    for fs in ("learned", "random_init", "engineered"):
        for m in ("linear_f1", "knn20_f1"):
            r = got.loc[(fs, m)]
            assert r.ci_low <= r.value <= r.ci_high and 0 < r.chance < 0.5
        assert got.loc[(fs, "n_classes"), "value"] == 3  # the controls are left out
        assert got.loc[(fs, "n_cells"), "value"] == len(meta) - 8
    assert (
        got.loc[("learned", "linear_f1"), "value"]
        > got.loc[("random_init", "linear_f1"), "ci_high"]
    )
    summary = json.loads((out / "summary.json").read_text())  # a derived set has no cells
    assert "no per-cell table" in summary["skipped"]["cell_probe on pca_engineered"]
    paired = pd.read_parquet(out / "tables" / "cell_probe__learned__paired_difference.parquet")
    assert set(paired.reference) == {"random_init"} and (paired.ci_low > 0).all()
    # the same cells in another order in random_init's shards: the same numbers
    perm = np.random.default_rng(0).permutation(len(meta))
    _, inputs_b = _run_folder(tmp_path / "b", order_random=perm)
    tidy_b, _ = _evaluate(inputs_b, tmp_path / "eval_b")
    cols = ["feature_set", "metric", "value", "chance", "ci_low", "ci_high"]
    pd.testing.assert_frame_equal(
        tidy[cols].sort_values(cols[:2]).reset_index(drop=True),
        tidy_b[cols].sort_values(cols[:2]).reset_index(drop=True),
    )


def test_cell_probe_with_max_cells_and_controls_included(tmp_path):
    meta, inputs = _run_folder(tmp_path)
    tidy, _ = _evaluate(inputs, tmp_path / "eval", max_cells=60, exclude_controls=False)
    got = tidy.set_index(["feature_set", "metric"])["value"]
    assert got[("learned", "n_cells")] == 60 and got[("learned", "n_classes")] == 4


def test_cell_probe_is_skipped_without_a_run_folder(tmp_path):
    """A plain per-cell table, not from a `celldino run` folder: NotEvaluable with the reason;
    through the runner, the analysis is skipped (here the only one, so evaluate says why)."""
    from celldino.errors import DataError
    from celldino.eval.analyses import run_cell_probe
    from celldino.eval.spec import EvalContext, NotEvaluable

    meta, X = _cells()
    df = pd.concat([meta, pd.DataFrame(X, columns=[f"f{i}" for i in range(X.shape[1])])], axis=1)
    df.to_parquet(tmp_path / "cells.parquet")

    class Source:  # what the runner hands an analysis as ctx.sets[name]
        source = str(tmp_path / "cells.parquet")

    ctx = EvalContext(feature_set="learned", sets={"learned": Source()})
    with pytest.raises(NotEvaluable, match=r"celldino run. folder .*analyses\.cell_probe\.run_dir"):
        run_cell_probe(meta, X, ctx)
    with pytest.raises(DataError, match="cell_probe on learned: .*run_dir"):
        runner.evaluate(
            None,
            spec={"inputs": {"learned": Source.source}, "analyses": ["cell_probe"]},
            cfg=EvaluateConfig(out_dir=str(tmp_path / "eval")),
        )
