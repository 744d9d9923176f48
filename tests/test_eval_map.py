"""mAP: the blocked computation against copairs itself, hand-worked AP, real LINCS plate."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import torch
from copairs.compute import random_ap as copairs_random_ap
from copairs.map import average_precision as copairs_ap
from copairs.map import mean_average_precision as copairs_map
from copairs.map.normalization import expected_ap as copairs_expected_ap

from celldino.eval import map as M
from celldino.eval.activity import phenotypic_activity

AP_COLS = ["n_pos_pairs", "n_total_pairs", "average_precision", "normalized_average_precision"]
MAP_COLS = [
    "mean_average_precision",
    "mean_normalized_average_precision",
    "p_value",
    "corrected_p_value",
]


def _screen(n_cpd=30, doses=2, reps=3, n_ctrl=16, d=12, seed=0):
    rng = np.random.default_rng(seed)
    rows = [
        (f"c{c}", dose, f"M{c % 4}", "trt")
        for c in range(n_cpd)
        for dose in range(doses)
        for _ in range(reps)
    ]
    rows += [("DMSO", 0, "none", "control")] * n_ctrl
    meta = pd.DataFrame(
        rows, columns=["Metadata_Compound", "Metadata_Dose", "Metadata_MoA", "Metadata_pert_type"]
    )
    centre = {c: rng.normal(size=d) for c in meta.Metadata_Compound.unique()}
    strength = {c: rng.uniform(0, 1.5) for c in centre}  # some compounds inactive
    X = np.stack([strength[c] * centre[c] + rng.normal(size=d) for c in meta.Metadata_Compound])
    return meta, X


def _assert_same_ap(a: pd.DataFrame, b: pd.DataFrame):
    assert list(a.columns) == list(b.columns)
    for c in AP_COLS:
        x, y = a[c].to_numpy(float), b[c].to_numpy(float)
        np.testing.assert_array_equal(np.isnan(x), np.isnan(y), err_msg=c)
        np.testing.assert_allclose(x[~np.isnan(x)], y[~np.isnan(y)], rtol=0, atol=1e-12, err_msg=c)


@pytest.mark.parametrize("block_bytes", [10_000, 1 << 28])  # many blocks / one block
def test_blocked_ap_equals_copairs(block_bytes, ranking):
    meta, X = _screen()
    rules = dict(
        pos_sameby=["Metadata_Compound", "Metadata_Dose"],
        pos_diffby=[],
        neg_sameby=[],
        neg_diffby=["Metadata_Compound"],
    )
    ref = copairs_ap(meta, X, progress_bar=False, **rules)
    ours = M.average_precision(meta, X, method="blocked", block_bytes=block_bytes, **rules)
    _assert_same_ap(ref, ours)
    assert ours.n_pos_pairs.max() > 0 and ours.average_precision.notna().sum() == len(meta)


@pytest.fixture(params=["count", "sort"])
def ranking(request, monkeypatch):
    """Run a test through both ranking paths of the blocked backend."""
    monkeypatch.setattr(M, "SORT_ABOVE_POSITIVES", 10**9 if request.param == "count" else -1)
    return request.param


def _tied_rows(meta, X, rules):
    """Queries where a positive and a negative share the float32 key copairs ranks by."""
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    key = 1 - (Xn @ Xn.T).astype(np.float32)
    g, b = meta["g"].to_numpy(), meta["b"].to_numpy()
    out = []
    for i in range(len(X)):
        pos = (g == g[i]) & (np.arange(len(X)) != i)
        neg = (g != g[i]) & (b == b[i])
        out.append(bool(np.isin(key[i][pos], key[i][neg]).any()))
    return np.array(out)


def test_blocked_ap_ties_against_copairs(ranking):
    # few distinct integer vectors: many exact similarity ties between positives and negatives.
    # copairs ranks a tied positive first (AP too high); celldino averages over the tie's orders
    rng = np.random.default_rng(1)
    n = 240
    # rows of batch 0 are integer vectors (ties); the others continuous: untied among themselves
    b = np.where(np.arange(n) < n // 2, 0, rng.integers(1, 3, n))
    meta = pd.DataFrame({"g": rng.integers(0, 15, n).astype(str), "b": b})
    X = rng.integers(1, 3, (n, 3)).astype(float)
    X[n // 2 :] = rng.normal(size=(n - n // 2, 3))
    rules = dict(pos_sameby=["g"], pos_diffby=[], neg_sameby=["b"], neg_diffby=["g"])
    ref = copairs_ap(meta, X, progress_bar=False, **rules)
    ours = M.average_precision(meta, X, method="blocked", block_bytes=5000, **rules)
    tied = _tied_rows(meta, X, rules)
    assert 20 < tied.sum() < n - 20
    _assert_same_ap(ref[~tied], ours[~tied])  # no tie: copairs' number
    assert (ours.average_precision[tied] < ref.average_precision[tied] - 1e-9).all()
    _assert_same_ap(M.average_precision(meta, X, method="auto", **rules), ours)  # not copairs


def _ap_over_tie_orders(key, pos, neg):
    """AP averaged over every order of the tied candidates, by enumerating the orders."""
    cand = np.flatnonzero(pos | neg)
    runs = [cand[key[cand] == v] for v in np.unique(key[cand])]
    aps = []
    for perms in itertools.product(*[list(itertools.permutations(r)) for r in runs]):
        rel = pos[np.concatenate(perms)]
        aps.append((np.cumsum(rel) / np.arange(1, len(rel) + 1))[rel].mean())
    return float(np.mean(aps))


def test_tied_ap_is_the_average_over_tie_orders(ranking):
    rng = np.random.default_rng(0)
    g = np.array(list("aaabbbccc"))
    X = rng.integers(1, 3, (9, 2)).astype(float)  # 3 distinct directions: ties everywhere
    out = M.average_precision(pd.DataFrame({"g": g}), X, pos_sameby=["g"], neg_diffby=["g"])
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    key = 1 - (Xn @ Xn.T).astype(np.float32)
    ref = [
        _ap_over_tie_orders(key[i], (g == g[i]) & (np.arange(9) != i), g != g[i]) for i in range(9)
    ]
    np.testing.assert_allclose(out.average_precision, ref, rtol=0, atol=1e-12)
    # the permutation null's kernel averages ties the same way
    pos = torch.from_numpy(np.stack([(g == x) for x in g]) & ~np.eye(9, dtype=bool))
    neg = torch.from_numpy(np.stack([(g != x) for x in g]))
    null_ap = M._ap_sorted(torch.from_numpy(key)[None], pos, neg, 2)[0].numpy()
    np.testing.assert_allclose(null_ap, ref, rtol=0, atol=1e-12)


def test_identical_profiles_score_chance_not_one(ranking):
    # a collapsed embedding: copairs gives every query AP 1.0; the tie average is the chance level
    meta = pd.DataFrame({"g": np.repeat(list("abcd"), 3)})
    X = np.ones((12, 5))
    rules = dict(pos_sameby=["g"], pos_diffby=[], neg_sameby=[], neg_diffby=["g"])
    assert (copairs_ap(meta, X, progress_bar=False, **rules).average_precision == 1).all()
    out = M.average_precision(meta, X, **rules)
    chance = [copairs_expected_ap(2, 9)] * 12  # 2 positives among 11 candidates
    np.testing.assert_allclose(out.average_precision, chance, rtol=0, atol=1e-12)
    np.testing.assert_allclose(out.normalized_average_precision, 0, atol=1e-12)


def test_average_precision_hand_worked(ranking):
    # query 0 at angle 0; ranking by similarity: 1 (pos, 10°), 2 (neg, 20°), 3 (pos, 30°)
    # 4 (neg) sits exactly on 3's angle: that tie scores its two orders' mean precision for 3
    # (2/3 + 2/4) / 2, so AP = (1/1 + 7/12) / 2 (copairs ranks 3 first: (1/1 + 2/3) / 2).
    ang = np.deg2rad([0, 10, 20, 30, 30])
    X = np.stack([np.cos(ang), np.sin(ang)], axis=1)
    meta = pd.DataFrame({"g": ["a", "a", "b", "a", "c"]})
    out = M.average_precision(meta, X, pos_sameby=["g"], neg_diffby=["g"], method="blocked")
    assert out.average_precision[0] == pytest.approx((1 + 7 / 12) / 2)
    assert out.n_pos_pairs[0] == 2 and out.n_total_pairs[0] == 4
    assert np.isnan(out.average_precision[2])  # no positives


def test_expected_ap_matches_copairs():
    M_, L = np.array([0, 1, 1, 2, 3, 5, 7, 40]), np.array([1, 1, 5, 2, 9, 20, 300, 1000])
    ref = [copairs_expected_ap(int(m), int(t - m)) for m, t in zip(M_, L)]
    np.testing.assert_allclose(M.expected_ap(M_, L), ref, rtol=1e-13)


def test_random_ap_equals_copairs_in_chunks():
    ours = M.random_ap(3000, 4, 9000, seed=17)  # 9000 columns → several row chunks
    np.testing.assert_array_equal(ours, copairs_random_ap(3000, 4, 9000, 17))


def test_mean_average_precision_equals_copairs(tmp_path):
    meta, X = _screen(seed=2)
    ap = copairs_ap(
        meta,
        X,
        ["Metadata_Compound", "Metadata_Dose"],
        [],
        [],
        ["Metadata_Compound"],
        progress_bar=False,
    )
    sameby = ["Metadata_Compound", "Metadata_Dose"]
    ref = copairs_map(ap, sameby, 2000, 0.05, 3, progress_bar=False, cache_dir=tmp_path)
    ours = M.mean_average_precision(ap, sameby=sameby, null_size=2000, seed=3)
    assert list(ours.columns) == list(ref.columns)
    for c in MAP_COLS:
        np.testing.assert_allclose(ours[c], ref[c], rtol=1e-12, atol=1e-15, err_msg=c)
    np.testing.assert_array_equal(ours.below_corrected_p, ref.below_corrected_p)
    assert 0 < M.fraction_retrieved(ours) < 1  # planted active and inactive compounds


def test_moa_map_equals_copairs(tmp_path, ranking):
    meta, X = _screen(seed=4)
    ap, maps = M.moa_map(
        meta,
        X,
        moa="Metadata_MoA",
        compound="Metadata_Compound",
        null_size=500,
        method="blocked",
        block_bytes=20_000,
    )
    trt = meta[meta.Metadata_pert_type == "trt"].reset_index(drop=True)
    ref_ap = copairs_ap(
        trt,
        X[(meta.Metadata_pert_type == "trt").to_numpy()],
        ["Metadata_MoA"],
        ["Metadata_Compound"],
        [],
        ["Metadata_MoA"],
        progress_bar=False,
    )
    _assert_same_ap(ref_ap, ap)
    ref = copairs_map(
        ref_ap, ["Metadata_MoA"], 500, 0.05, 0, progress_bar=False, cache_dir=tmp_path
    )
    for c in MAP_COLS:
        np.testing.assert_allclose(maps[c], ref[c], rtol=1e-12, err_msg=c)


def test_missing_metadata_is_a_clear_error():
    meta, X = _screen()
    meta.loc[3, "Metadata_Dose"] = np.nan
    with pytest.raises(ValueError, match=r"Metadata_Dose.*rows \[3\]"):
        M.average_precision(meta, X, pos_sameby=["Metadata_Dose"], neg_diffby=["Metadata_Dose"])


# ---- the real LINCS plate --------------------------------------------------------------------


def _lincs(path):
    df = pd.read_csv(path)
    feats = [c for c in df.columns if not c.startswith("Metadata_")]
    meta = df[[c for c in df.columns if c.startswith("Metadata_")]]
    return meta, df[feats].to_numpy(float)


def _copairs_reference_index(meta):
    """copairs' phenotypic-activity recipe: each control gets its own reference index."""
    m = meta.copy()
    ctrl = (m.Metadata_pert_type == "control").to_numpy()
    m["Metadata_reference_index"] = np.where(ctrl, np.arange(len(m)), -1)
    return m


@pytest.mark.parametrize("method", ["copairs", "blocked"])
def test_lincs_activity_vs_dmso_equals_copairs(lincs_csv, tmp_path, method):
    meta, X = _lincs(lincs_csv)
    ap, maps, summary = phenotypic_activity(
        meta, X, by=["Metadata_broad_sample"], null_size=1000, seed=0, method=method
    )
    m = _copairs_reference_index(meta)
    ref_ap = copairs_ap(
        m,
        X,
        ["Metadata_broad_sample", "Metadata_reference_index"],
        [],
        [],
        ["Metadata_broad_sample", "Metadata_reference_index"],
        progress_bar=False,
    )
    _assert_same_ap(ref_ap.drop(columns="Metadata_reference_index"), ap)
    ref = copairs_map(
        ref_ap, ["Metadata_broad_sample"], 1000, 0.05, 0, progress_bar=False, cache_dir=tmp_path
    )
    for c in MAP_COLS:
        np.testing.assert_allclose(maps[c], ref[c], rtol=1e-12, err_msg=c)
    assert summary["fraction_retrieved"] == pytest.approx(ref.below_corrected_p.mean())
    assert summary["n_groups"] == 58  # 56 six-dose compounds + 2 at one dose in 12 wells


def test_lincs_compound_retrieval_across_doses_equals_copairs(lincs_csv, tmp_path):
    meta, X = _lincs(lincs_csv)
    ap, maps = M.retrieval_map(
        meta,
        X,
        by=["Metadata_broad_sample"],
        pos_diffby=["Metadata_mmoles_per_liter"],
        negatives="others",
        null_size=1000,
        seed=0,
        method="blocked",
    )
    m = _copairs_reference_index(meta)
    ref_ap = copairs_ap(
        m,
        X,
        ["Metadata_broad_sample", "Metadata_reference_index"],
        ["Metadata_mmoles_per_liter"],
        [],
        ["Metadata_broad_sample"],
        progress_bar=False,
    )
    _assert_same_ap(ref_ap.drop(columns="Metadata_reference_index"), ap)
    ref = copairs_map(
        ref_ap, ["Metadata_broad_sample"], 1000, 0.05, 0, progress_bar=False, cache_dir=tmp_path
    )
    for c in MAP_COLS:
        np.testing.assert_allclose(maps[c], ref[c], rtol=1e-12, err_msg=c)
    assert (ap.loc[meta.Metadata_pert_type == "control", "n_pos_pairs"] == 0).all()
