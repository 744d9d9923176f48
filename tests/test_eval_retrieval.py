"""NSC / NSCB and folds of enrichment against hand-worked examples and brute-force peers."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import scipy.stats
from sklearn.neighbors import NearestNeighbors

from celldino.eval.enrichment import enrichment
from celldino.eval.nsc import nsc_nscb, treatment_profiles

# Hand-worked example: six treatments as unit vectors at these angles (degrees).
HAND = pd.DataFrame(
    {
        "Metadata_Compound": ["a", "a", "c", "d", "e", "f"],
        "Metadata_Dose": [1, 2, 1, 1, 1, 1],
        "Metadata_MoA": ["M1", "M1", "M1", "M2", "M2", "M3"],
        "Metadata_Batch": ["b1", "b1", "b2", "b1", "b2", "b1"],
        "Metadata_pert_type": ["trt"] * 6,
    }
)
ANGLES = np.array([0.0, 10.0, 25.0, 45.0, 100.0, 180.0])


def _vectors(angles: np.ndarray) -> np.ndarray:
    rad = np.deg2rad(angles)
    return np.stack([np.cos(rad), np.sin(rad)], axis=1)


def test_nsc_nscb_hand_worked():
    # NSC: A→C ok, B→C ok, C→B ok, D→C wrong, E→D ok = 4/5; F (M3's only compound: no
    # profile could match it) is not scored as a query (F→E would be wrong whatever X is).
    # NSCB: F's MoA (M3) lives in b1 only → dropped; A→C, B→C, C→B, E→D ok; D→C wrong = 4/5.
    metrics, table = nsc_nscb(
        HAND,
        _vectors(ANGLES),
        moa="Metadata_MoA",
        compound="Metadata_Compound",
        batch="Metadata_Batch",
    )
    assert metrics["NSC"] == pytest.approx(4 / 5)
    assert metrics["NSCB"] == pytest.approx(4 / 5)
    assert metrics["NSC_n"] == 5 and metrics["NSCB_n"] == 5
    nsc = table[table.metric == "NSC"]
    assert list(nsc["neighbour_compound"]) == ["c", "c", "a", "c", "d"]
    nscb = table[table.metric == "NSCB"]
    assert "f" not in set(nscb["Metadata_Compound"])


def test_nsc_aggregates_wells_and_drops_controls():
    rng = np.random.default_rng(0)
    rows, vecs = [], []
    for i, r in HAND.iterrows():
        for _ in range(3):  # three wells per treatment, jittered around the treatment angle
            rows.append(r.to_dict())
            vecs.append(ANGLES[i] + rng.normal(scale=0.5))
    for _ in range(4):  # controls right next to treatment D: must not be neighbours
        rows.append(
            {
                **HAND.iloc[0].to_dict(),
                "Metadata_Compound": "DMSO",
                "Metadata_MoA": "none",
                "Metadata_pert_type": "control",
            }
        )
        vecs.append(46.0)
    wells = pd.DataFrame(rows)
    metrics, _ = nsc_nscb(
        wells,
        _vectors(np.array(vecs)),
        moa="Metadata_MoA",
        compound="Metadata_Compound",
        treatment=["Metadata_Compound", "Metadata_Dose"],
        batch="Metadata_Batch",
    )
    assert metrics["NSC"] == pytest.approx(4 / 5)
    assert metrics["NSCB"] == pytest.approx(4 / 5)


def test_treatment_profiles_median():  # pp.consensus, the one aggregation of replicates
    meta = pd.DataFrame({"t": ["x", "y", "x", "x", "y"]})
    X = np.array([[1.0, 0], [5, 5], [3, 1], [2, 7], [1, 1]])
    m, A = treatment_profiles(meta, X, by=["t"], how="median")
    assert list(m["t"]) == ["x", "y"] and list(m["Metadata_Count_Replicates"]) == [3, 2]
    np.testing.assert_allclose(A, [[2, 1], [3, 3]])


def _brute_force(meta: pd.DataFrame, X: np.ndarray, batch: bool) -> float:
    """First allowed neighbour in sklearn's exhaustive cosine ranking."""
    if batch:
        n_b = meta.groupby("Metadata_MoA")["Metadata_Batch"].nunique()
        keep = (meta["Metadata_MoA"].map(n_b) > 1).to_numpy()
        meta, X = meta[keep].reset_index(drop=True), X[keep]
    nn = NearestNeighbors(n_neighbors=len(X), metric="cosine", algorithm="brute").fit(X)
    _, order = nn.kneighbors(X)
    hits = []
    for q in range(len(X)):
        for j in order[q]:
            if meta.Metadata_Compound[j] == meta.Metadata_Compound[q]:
                continue
            if batch and meta.Metadata_Batch[j] == meta.Metadata_Batch[q]:
                continue
            hits.append(meta.Metadata_MoA[j] == meta.Metadata_MoA[q])
            break
    return float(np.mean(hits))


def test_nsc_nscb_match_brute_force():
    rng = np.random.default_rng(3)
    n_moa, cpd_per_moa, doses = 5, 4, 3
    rows, vecs = [], []
    moa_centres = rng.normal(size=(n_moa, 16))
    for m in range(n_moa):
        for c in range(cpd_per_moa):
            batch = f"b{(c + (m == 0)) % 3}" if m else "b0"  # MoA 0 lives in one batch
            cpd_centre = moa_centres[m] + 0.8 * rng.normal(size=16)
            for d in range(doses):
                rows.append((f"m{m}c{c}", d, f"M{m}", batch))
                vecs.append(cpd_centre + 0.7 * rng.normal(size=16))
    meta = pd.DataFrame(
        rows, columns=["Metadata_Compound", "Metadata_Dose", "Metadata_MoA", "Metadata_Batch"]
    )
    X = np.array(vecs)
    metrics, _ = nsc_nscb(
        meta,
        X,
        moa="Metadata_MoA",
        compound="Metadata_Compound",
        batch="Metadata_Batch",
        control=None,
    )
    assert metrics["NSC"] == pytest.approx(_brute_force(meta, X, batch=False))
    assert metrics["NSCB"] == pytest.approx(_brute_force(meta, X, batch=True))
    assert metrics["NSCB_n"] == len(meta) - cpd_per_moa * doses
    assert 0.2 < metrics["NSC"] < 1.0  # informative, not trivial


def test_nsc_multilabel_moa():
    meta = HAND.assign(Metadata_MoA=["M1", "M1", "M1", "M2|M1", "M2", "M3"])
    metrics, _ = nsc_nscb(
        meta, _vectors(ANGLES), moa="Metadata_MoA", compound="Metadata_Compound", moa_sep="|"
    )
    assert metrics["NSC"] == pytest.approx(5 / 5)  # D→C now shares M1; F (M3 alone) unscored


def test_nsc_missing_column_is_clear():
    with pytest.raises(KeyError, match="Metadata_Nope"):
        nsc_nscb(HAND, _vectors(ANGLES), moa="Metadata_Nope", compound="Metadata_Compound")


def _moa_screen(seed: int = 0, n: int = 40):
    rng = np.random.default_rng(seed)
    moas = rng.integers(0, 4, n)
    centres = rng.normal(size=(4, 8))
    X = centres[moas] + 1.2 * rng.normal(size=(n, 8))
    meta = pd.DataFrame(
        {
            "Metadata_MoA": [f"M{m}" for m in moas],
            "Metadata_Compound": [f"c{i // 2}" for i in range(n)],
        }
    )
    return meta, X


def test_enrichment_matches_fisher_exact_and_brute_force():
    meta, X = _moa_screen()
    out = enrichment(
        meta,
        X,
        moa="Metadata_MoA",
        compound="Metadata_Compound",
        percentiles=(1, 5, 20),
        control=None,
    )
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    pairs = [
        (i, j)
        for i, j in itertools.combinations(range(len(X)), 2)
        if meta.Metadata_Compound[i] != meta.Metadata_Compound[j]
    ]
    sims = np.array([Xn[i] @ Xn[j] for i, j in pairs])
    same = np.array([meta.Metadata_MoA[i] == meta.Metadata_MoA[j] for i, j in pairs])
    for _, row in out.iterrows():
        k = int(np.ceil(len(pairs) * row.percentile / 100))
        cutoff = np.sort(sims)[::-1][k - 1]
        top = sims >= cutoff
        assert top.sum() == row.n_top and row.similarity_cutoff == pytest.approx(cutoff)
        table = [
            [(same & top).sum(), (~same & top).sum()],
            [(same & ~top).sum(), (~same & ~top).sum()],
        ]
        ref = scipy.stats.fisher_exact(table, alternative="greater")
        assert [row.same_top, row.diff_top, row.same_rest, row.diff_rest] == sum(table, [])
        assert row.odds_ratio == pytest.approx(ref.statistic)
        assert row.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    assert out.odds_ratio.iloc[0] > 1  # the planted MoA structure is enriched


def test_enrichment_multilabel_and_bad_percentile():
    meta = pd.DataFrame({"Metadata_MoA": ["A|B", "B", "C", "C|A"]})
    X = np.array([[1.0, 0.1], [1.0, 0.2], [0.0, 1.0], [0.1, 1.0]])
    out = enrichment(meta, X, moa="Metadata_MoA", percentiles=(50,), moa_sep="|", control=None)
    # pairs sharing a label: (0,1) B, (0,3) A, (2,3) C; top 3 of 6 = (0,1), (2,3), (0,3)?
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    sims = {(i, j): Xn[i] @ Xn[j] for i, j in itertools.combinations(range(4), 2)}
    top = sorted(sims, key=sims.get, reverse=True)[:3]
    shared = {(0, 1), (0, 3), (2, 3)}
    assert out.same_top[0] == len(shared & set(top))
    with pytest.raises(ValueError, match="percentile"):
        enrichment(meta, X, moa="Metadata_MoA", percentiles=(0,), control=None)


def test_nscb_is_nan_when_every_moa_lives_in_one_batch():
    meta = HAND.assign(Metadata_Batch="b1")
    metrics, _ = nsc_nscb(
        meta,
        _vectors(ANGLES),
        moa="Metadata_MoA",
        compound="Metadata_Compound",
        batch="Metadata_Batch",
    )
    assert metrics["NSC"] == pytest.approx(4 / 5)
    assert np.isnan(metrics["NSCB"]) and metrics["NSCB_n"] == 0
