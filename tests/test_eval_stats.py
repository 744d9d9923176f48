"""Chance levels, permutation nulls, bootstrap intervals and degenerate-evaluation flags
(celldino.eval.stats), checked against hand-worked values, sklearn, copairs and simulation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.dummy import DummyClassifier
from sklearn.metrics import f1_score

from celldino.eval import stats
from celldino.eval.classify import knn_f1
from celldino.eval.map import average_precision, retrieval_map, with_statistics
from celldino.eval.nsc import nsc_nscb

HAND = pd.DataFrame(
    {
        "Metadata_Compound": ["a", "a", "c", "d", "e", "f"],
        "Metadata_Dose": [1, 2, 1, 1, 1, 1],
        "Metadata_MoA": ["M1", "M1", "M1", "M2", "M2", "M3"],
        "Metadata_Batch": ["b1", "b1", "b2", "b1", "b2", "b1"],
    }
)
ANGLES = np.deg2rad([0.0, 10.0, 25.0, 45.0, 100.0, 180.0])
XHAND = np.stack([np.cos(ANGLES), np.sin(ANGLES)], axis=1)


def _nsc(meta, X, **kw):
    return nsc_nscb(
        meta,
        X,
        moa="Metadata_MoA",
        compound="Metadata_Compound",
        control=None,
        return_stats=True,
        **kw,
    )


# ---- NSC ----------------------------------------------------------------------------------------


def test_nsc_chance_hand_worked():
    # allowed neighbours (other compounds) sharing the MoA: A 1/4 (c), B 1/4, C 2/5 (a, a),
    # D 1/5 (e), E 1/5 (d), F 0/5: F's MoA has no other compound, no profile could match it,
    # so it is not scored (it stays a neighbour) → mean 1.3 / 5 over 5 queries.
    # NSCB (F dropped: M3 in one batch): A: b2 = {c, e} → 1/2, B 1/2, C: b1 = {a, a, d} → 2/3,
    # D: {c, e} → 1/2, E: {a, a, d} → 1/3 → mean 2.5 / 5.
    metrics, table, st = _nsc(HAND, XHAND, batch="Metadata_Batch", n_boot=50, null_size=50)
    assert st["NSC"]["chance"] == pytest.approx(1.3 / 5)
    assert st["NSCB"]["chance"] == pytest.approx(2.5 / 5)
    nsc = table[table.metric == "NSC"]
    assert nsc["chance"].to_numpy() == pytest.approx([1 / 4, 1 / 4, 2 / 5, 1 / 5, 1 / 5])
    assert st["NSC"]["n_queries"] == 5
    assert "only 5 treatments" in st["NSC"]["flags"]  # below MIN_QUERIES
    lo, hi = st["NSC"]["ci_low"], st["NSC"]["ci_high"]
    assert 0 <= lo <= metrics["NSC"] <= hi <= 1


def _screen(seed: int, signal: float, n_moa: int = 4, cpds: int = 6, doses: int = 3):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_moa, 12))
    rows, vecs = [], []
    for m in range(n_moa):
        for c in range(cpds):
            centre = signal * centres[m] + rng.normal(size=12)
            for d in range(doses):
                rows.append((f"m{m}c{c}", d, f"M{m}", f"b{(c + d) % 2}"))
                vecs.append(centre + 0.5 * rng.normal(size=12))
    meta = pd.DataFrame(
        rows, columns=["Metadata_Compound", "Metadata_Dose", "Metadata_MoA", "Metadata_Batch"]
    )
    return meta, np.array(vecs)


def test_nsc_chance_matches_random_neighbour_simulation():
    meta, X = _screen(0, 1.0)
    meta = meta.assign(
        Metadata_MoA=np.where(np.arange(len(meta)) % 5 == 0, "M0", meta.Metadata_MoA)
    )
    _, table, st = _nsc(meta, X, batch="Metadata_Batch", n_boot=0, null_size=0)
    rng = np.random.default_rng(1)
    n_b = meta.groupby("Metadata_MoA").Metadata_Batch.nunique()
    multi = (meta.Metadata_MoA.map(n_b) > 1).to_numpy()
    cpd, moa, bat = (
        meta[c].to_numpy() for c in ("Metadata_Compound", "Metadata_MoA", "Metadata_Batch")
    )
    for metric, batch in (("NSC", False), ("NSCB", True)):
        q = table[table.metric == metric]
        hits = []
        for _, r in q.iterrows():  # many random allowed neighbours for every query
            ok = cpd != r.Metadata_Compound
            if batch:
                ok &= (bat != r.Metadata_Batch) & multi
            j = rng.choice(np.flatnonzero(ok), size=400)
            hits.append(np.mean(moa[j] == r.Metadata_MoA))
        assert st[metric]["chance"] == pytest.approx(np.mean(hits), abs=0.01)


def test_nsc_permutation_p_small_with_effect_uniformish_without():
    _, _, st = _nsc(*_screen(0, 3.0), null_size=500, n_boot=0)
    assert st["NSC"]["p_perm"] < 0.01
    ps = [_nsc(*_screen(s, 0.0), null_size=200, n_boot=0)[2]["NSC"]["p_perm"] for s in range(40)]
    assert 0.3 < np.mean(ps) < 0.7  # uniform: mean 0.5
    assert np.mean(np.array(ps) < 0.1) < 0.25  # about 10 % below 0.1


# ---- bootstrap ---------------------------------------------------------------------------------


def test_bootstrap_interval_covers_the_truth_at_about_the_nominal_rate():
    rng = np.random.default_rng(0)
    cover = []
    for _ in range(300):
        x = rng.binomial(1, 0.3, size=80).astype(float)
        lo, hi = stats.percentile_ci(stats.cluster_bootstrap_mean(x, None, 400, rng))
        cover.append(lo <= 0.3 <= hi)
    assert 0.9 <= np.mean(cover) <= 0.99


def test_cluster_bootstrap_covers_clustered_data_where_a_row_bootstrap_does_not():
    # 30 compounds × 5 doses sharing a compound effect: the compound is the independent unit
    rng = np.random.default_rng(1)
    g = np.repeat(np.arange(30), 5)
    cover_cluster, cover_rows = [], []
    for _ in range(200):
        x = rng.normal(size=30)[g] + rng.normal(size=150)  # true mean 0
        lo, hi = stats.percentile_ci(stats.cluster_bootstrap_mean(x, g, 300, rng))
        cover_cluster.append(lo <= 0 <= hi)
        lo, hi = stats.percentile_ci(stats.cluster_bootstrap_mean(x, None, 300, rng))
        cover_rows.append(lo <= 0 <= hi)
    assert 0.88 <= np.mean(cover_cluster) <= 0.99
    assert np.mean(cover_rows) < 0.8  # rows as units: too narrow


def test_cluster_and_stratified_bootstrap_against_loops():
    rng = np.random.default_rng(0)
    v = rng.normal(size=30)
    g = np.repeat(np.arange(6), 5)
    boot = stats.stratified_group_means(v, g, 5000, np.random.default_rng(1))
    assert boot.mean(axis=0) == pytest.approx(v.reshape(6, 5).mean(axis=1), abs=0.03)
    assert boot.std(axis=0) == pytest.approx(v.reshape(6, 5).std(axis=1) / np.sqrt(5), rel=0.1)
    cb = stats.cluster_bootstrap_mean(v, g, 5000, np.random.default_rng(2))
    means = v.reshape(6, 5).mean(axis=1)  # equal cluster sizes: mean of resampled cluster means
    assert cb.std() == pytest.approx(means.std() / np.sqrt(6), rel=0.1)


# ---- classification ---------------------------------------------------------------------------


def test_macro_f1_batch_matches_sklearn_with_and_without_weights():
    rng = np.random.default_rng(0)
    yt, yp = rng.integers(0, 4, 50), rng.integers(0, 5, 50)
    assert stats.macro_f1_batch(yt, yp, 5)[0] == pytest.approx(f1_score(yt, yp, average="macro"))
    W = stats.bootstrap_counts(50, 20, rng)
    got = stats.macro_f1_batch(yt, yp, 5, W)
    want = [
        f1_score(np.repeat(yt, w), np.repeat(yp, w), average="macro", zero_division=0) for w in W
    ]
    assert got == pytest.approx(want)
    perms = np.stack([rng.permutation(yt) for _ in range(10)])
    want = [f1_score(p, yp, average="macro") for p in perms]
    assert stats.macro_f1_batch(perms, yp, 5) == pytest.approx(want)


def test_f1_chance_against_sklearn_dummy_classifiers():
    rng = np.random.default_rng(0)
    y_train = rng.choice(4, 3000, p=[0.5, 0.3, 0.15, 0.05])
    y_test = rng.choice(4, 3000, p=[0.4, 0.3, 0.2, 0.1])
    ch = stats.f1_chance(y_train, y_test, 4)
    Xd = np.zeros((len(y_train), 1))
    maj = DummyClassifier(strategy="most_frequent").fit(Xd, y_train).predict(Xd[: len(y_test)])
    assert ch["majority"] == pytest.approx(f1_score(y_test, maj, average="macro"))
    strat = [
        f1_score(
            y_test,
            DummyClassifier(strategy="stratified", random_state=s)
            .fit(Xd, y_train)
            .predict(Xd[: len(y_test)]),
            average="macro",
        )
        for s in range(20)
    ]
    assert ch["stratified"] == pytest.approx(np.mean(strat), abs=0.01)
    assert ch["chance"] == max(ch["majority"], ch["stratified"])


def _cells(seed: int, signal: float, n_cpd: int = 24, per: int = 8):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, 10))
    moa = np.repeat(np.arange(n_cpd) % 3, per)
    X = signal * centres[moa] + rng.normal(size=(len(moa), 10))
    meta = pd.DataFrame(
        {
            "Metadata_MoA": [f"M{m}" for m in moa],
            "Metadata_Compound": np.repeat(np.arange(n_cpd), per),
        }
    )
    return meta, X


def test_knn_f1_stats_null_and_effect_and_flags():
    kw = dict(label="Metadata_MoA", split_by="Metadata_Compound", ks=(5,), n_boot=200)
    t = knn_f1(*_cells(0, 2.0, n_cpd=48, per=4), n_perm=500, **kw)
    r = t.iloc[0]
    assert r.p_perm < 0.01 and r.ci_low <= r.macro_f1 <= r.ci_high
    assert r.chance == pytest.approx(1 / 3, abs=0.1) and r.n_queries == r.n_test
    ps = [knn_f1(*_cells(s, 0.0), n_perm=200, **kw).iloc[0].p_perm for s in range(30)]
    assert 0.3 < np.mean(ps) < 0.7
    # k >= training rows, one class in the test set
    meta, X = _cells(0, 1.0, n_cpd=3, per=4)
    t = knn_f1(
        meta, X, label="Metadata_MoA", ks=(50,), train_idx=np.arange(8), test_idx=np.arange(8, 12)
    )
    assert "k=50 >= 8 training rows" in t.iloc[0]["flags"]
    assert "one class in the test set" in t.iloc[0]["flags"]


# ---- mAP -------------------------------------------------------------------------------------


def test_map_chance_is_copairs_expected_ap_and_matches_simulation():
    # one positive among L candidates: E[AP] = H_L / L
    L = 7
    from celldino.eval.map import expected_ap

    assert expected_ap(np.array([1]), np.array([L]))[0] == pytest.approx(
        sum(1 / k for k in range(1, L + 1)) / L
    )
    rng = np.random.default_rng(0)
    sims = []
    for _ in range(20000):  # AP of 3 positives randomly placed among 10
        rel = np.zeros(10, bool)
        rel[rng.choice(10, 3, replace=False)] = True
        sims.append(np.mean(np.cumsum(rel)[rel] / (np.flatnonzero(rel) + 1)))
    assert expected_ap(np.array([3]), np.array([10]))[0] == pytest.approx(np.mean(sims), abs=0.005)


def _plate(seed: int, signal: float, n_cpd: int = 20, reps: int = 3, n_ctrl: int = 16):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_cpd, 16))
    cpd = np.repeat(np.arange(n_cpd), reps)
    X = np.vstack([signal * centres[cpd], np.zeros((n_ctrl, 16))]) + rng.normal(
        size=(len(cpd) + n_ctrl, 16)
    )
    meta = pd.DataFrame(
        {
            "Metadata_Compound": [f"c{c}" for c in cpd] + ["DMSO"] * n_ctrl,
            "Metadata_pert_type": ["trt"] * len(cpd) + ["control"] * n_ctrl,
        }
    )
    return meta, X


def _map_stats(meta, X, null_size, n_boot=0, seed=0):
    _, maps, st = retrieval_map(
        meta,
        X,
        by=["Metadata_Compound"],
        negatives="controls",
        null_size=10,
        n_perm=null_size,
        n_boot=n_boot,
        seed=seed,
        return_stats=True,
        show_progress=False,
    )
    return maps, st


def test_map_stats_chance_interval_p_and_null():
    maps, st = _map_stats(*_plate(0, 1.0), null_size=1000, n_boot=300)
    assert st["p_perm"] < 0.01
    assert st["chance"] == pytest.approx(maps["chance"].mean())
    # 3 replicates: 2 positives among 2 + 16 controls per query, all queries alike
    from celldino.eval.map import expected_ap

    assert st["chance"] == pytest.approx(expected_ap(np.array([2]), np.array([18]))[0])
    assert st["ci_low"] <= maps["mean_average_precision"].mean() <= st["ci_high"]
    assert (maps.ci_low <= maps.mean_average_precision).all()
    assert (maps.mean_average_precision <= maps.ci_high).all()
    ps = [_map_stats(*_plate(s, 0.0), null_size=200)[1]["p_perm"] for s in range(24)]
    # valid (about 10 % or fewer below 0.1), conservative: replicates share a null draw
    assert 0.35 < np.mean(ps) < 0.8
    assert np.mean(np.array(ps) < 0.1) < 0.2


def test_map_singletons_counted_and_flagged(caplog):
    meta, X = _plate(0, 1.0, n_cpd=12, reps=1)
    meta.loc[:2, "Metadata_Compound"] = "c0"  # one compound with 3 wells, 9 singletons
    ap = average_precision(
        meta, X, pos_sameby=["Metadata_Compound"], neg_diffby=["Metadata_Compound"]
    )
    with caplog.at_level("WARNING"):
        _, st = with_statistics(
            ap,
            pd.DataFrame({"Metadata_Compound": ["c0"], "mean_average_precision": [0.5]}),
            ["Metadata_Compound"],
            null=None,
            n_boot=0,
            control="Metadata_pert_type",
        )
    assert "9 of 10 groups dropped as singletons (1 kept)" in st["flags"]
    assert "9 of 10 groups" in caplog.text and "only 1 group" in st["flags"]
    assert np.isnan(st["p_perm"]) and st["n_queries"] == 3


def test_map_permutation_null_is_the_rule_set_on_shuffled_rows():
    # the null's first draw equals retrieval_map run on metadata shuffled by that permutation
    from celldino.eval.map import permuted_map_null

    meta, X = _plate(1, 0.5, n_cpd=6, reps=3, n_ctrl=8)
    m = meta.assign(
        _celldino_ref=np.where(meta.Metadata_pert_type == "control", np.arange(len(meta)), -1),
        _celldino_is_control=meta.Metadata_pert_type == "control",
    )
    rules = dict(
        pos_sameby=["Metadata_Compound", "_celldino_ref"],
        pos_diffby=[],
        neg_sameby=[],
        neg_diffby=["_celldino_is_control"],
    )
    null = permuted_map_null(
        m, X, **rules, sameby=["Metadata_Compound"], n_perm=3, rng=np.random.default_rng(5)
    )
    perm = np.random.default_rng(5).permuted(np.tile(np.arange(len(X)), (3, 1)), axis=1)[0]
    _, maps = retrieval_map(
        meta,
        X[perm],
        by=["Metadata_Compound"],
        negatives="controls",
        null_size=10,
        show_progress=False,
    )
    assert null[0] == pytest.approx(maps["mean_average_precision"].mean())


# ---- across feature sets ----------------------------------------------------------------------


def test_identical_feature_sets_are_flagged():
    rows = [
        {"feature_set": s, "analysis": "nsc", "metric": m, "value": v, "chance": c}
        for s in ("a", "b", "c")
        for m, v, c in (("NSC", 0.5 if s != "c" else 0.6, 0.2), ("NSC_n", 10.0, np.nan))
    ]
    tidy, flagged = stats.metrics_table(rows)
    assert list(tidy.columns[4:]) == list(stats.STAT_COLUMNS)
    f = tidy.set_index(["feature_set", "metric"])["flags"]
    assert "identical to feature set 'b'" in f["a", "NSC"]
    assert "identical to feature set 'a'" in f["b", "NSC"]
    assert f["c", "NSC"] == "" and f["a", "NSC_n"] == ""
    assert set(flagged) == {"nsc on a", "nsc on b"}


def test_p_value_plus_one():
    assert stats.p_value(1.0, np.array([0.0, 0.5, 1.0, 2.0])) == pytest.approx(3 / 5)
    assert stats.p_value(5.0, np.zeros(99)) == pytest.approx(1 / 100)


# ---- the real LINCS plate ---------------------------------------------------------------------


def test_lincs_default_map_replicate_says_it_kept_2_of_338_groups(lincs_csv, tmp_path, caplog):
    # one well per compound and dose: the default replicate groups (compound + dose) are
    # singletons but for 2, which used to print mAP 0.977 silently
    from celldino.config import EvaluateConfig
    from celldino.eval.runner import evaluate

    spec = {
        "columns": {
            "compound": "Metadata_pert_id",
            "dose": "Metadata_mmoles_per_liter",
            "moa": "Metadata_moa",
        },
        "analyses": {"map_replicate": {}, "activity": {}},
    }
    cfg = EvaluateConfig(out_dir=str(tmp_path / "ev"), null_size=200, n_boot=100)
    with caplog.at_level("WARNING"):
        out = evaluate(lincs_csv, spec=spec, cfg=cfg)
    tidy = pd.read_parquet(out / "metrics.parquet").set_index(["analysis", "metric"])
    rep = tidy.loc[("map_replicate", "mAP")]
    assert "336 of 338 groups dropped as singletons (2 kept)" in rep["flags"]
    assert "336 of 338 groups" in caplog.text
    act = tidy.loc[("activity", "mAP")]
    assert act["value"] == pytest.approx(0.6178, abs=1e-4)  # docs/validation.md, as copairs
    assert act["n_queries"] == 360  # 58 compounds' wells, DMSO not
    # pycytominer's table: whether its normalisation was fitted on these DMSO wells is unknown
    assert act["flags"].startswith("negatives: all 24 controls") and "unknown" in act["flags"]
    assert act["chance"] < act["ci_low"] <= act["value"] <= act["ci_high"]
    assert act["p_perm"] == pytest.approx(1 / 201)  # no permutation reaches it


def test_spec_permutations_sets_the_map_null_size(tmp_path):
    from celldino.config import EvaluateConfig
    from celldino.eval.runner import evaluate

    meta, X = _plate(0, 2.0)
    table = pd.concat([meta, pd.DataFrame(X, columns=[f"f{j}" for j in range(X.shape[1])])], axis=1)
    table.to_parquet(tmp_path / "p.parquet")
    spec = {"analyses": {"activity": {"permutations": 50}}}
    cfg = EvaluateConfig(out_dir=str(tmp_path / "ev"), null_size=100, n_boot=50)
    out = evaluate(tmp_path / "p.parquet", spec=spec, cfg=cfg)
    row = pd.read_parquet(out / "metrics.parquet").set_index("metric").loc["mAP"]
    assert row["p_perm"] == pytest.approx(1 / 51)  # planted effect: no permutation reaches it
