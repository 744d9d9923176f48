"""bench/profile_lowo.py, the recipe selection on real BBBC021 profiles: its fold scores against
an independent 1-NN computation in numpy, the default's per-fold scores against pycytominer's,
and the harness's pipeline against `celldino profile`'s own `process`."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lowo():
    spec = importlib.util.spec_from_file_location(
        "profile_lowo", ROOT / "bench" / "profile_lowo.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["profile_lowo"] = mod
    spec.loader.exec_module(mod)
    mod._quiet()
    return mod


@pytest.fixture(scope="module")
def wells(shared_data, lowo):
    return lowo.load(shared_data / "bbbc021_profiles" / "bbbc021_per_well_odd_weeks.csv.gz")


def _numpy_fold(t, week: str) -> dict[str, tuple[int, int]]:
    """NSC / NSCB of the queries of `week` by hand: cosine 1-NN over every treatment, other
    compound (and other week for NSCB); queries with no allowed same-MoA neighbour unscored."""
    P = np.asarray(t.X, dtype=np.float64)
    P = P / np.linalg.norm(P, axis=1, keepdims=True)
    sim = P @ P.T
    cpd = t.obs["Metadata_Compound"].to_numpy()
    moa = t.obs["Metadata_MoA"].to_numpy()
    wk = t.obs["Metadata_Batch"].to_numpy()
    out = {}
    for metric in ("NSC", "NSCB"):
        keep = np.ones(len(moa), bool)
        if metric == "NSCB":  # MoAs of one week leave the NSCB evaluation entirely
            keep = np.array([len(set(wk[moa == m])) > 1 for m in moa])
        hits = []
        for i in np.flatnonzero(keep & (wk == week)):
            allow = keep & (cpd != cpd[i])
            if metric == "NSCB":
                allow &= wk != wk[i]
            if not (allow & (moa == moa[i])).any():
                continue
            hits.append(moa[np.argmax(np.where(allow, sim[i], -np.inf))] == moa[i])
        out[metric] = (int(np.sum(hits)), len(hits))
    return out


def test_fold_scores_match_numpy(wells, lowo):
    """Every fold of the default and of pycytominer's workflow, scored by celldino.eval.nsc,
    equals the hand computation on the same treatment profiles."""
    for cand in (lowo.DEFAULT, lowo.PYCYTOMINER):
        assert cand.name.startswith(("celldino 0.4.0", "pycytominer"))
        for week in sorted(wells.obs["Metadata_Batch"].unique()):
            fit = (wells.obs["Metadata_Batch"] != week).to_numpy()
            t = lowo.treatments(lowo.apply(wells, cand, fit), cand.consensus)
            got = lowo.summary(lowo.score_fold(wells, cand, week))
            for metric, (hit, n) in _numpy_fold(t, week).items():
                assert got.get(f"{metric}:{week}", (0, 0)) == (hit, n), (cand.name, week, metric)


def test_default_beats_or_matches_pycytominer_on_every_fold(wells, lowo):
    """The choice docs/profiling.md reports: the default's correct queries are at least
    pycytominer's on every held-out week, for NSC and NSCB, and the pooled targets hold."""
    ours = lowo.summary(lowo.lowo(wells, lowo.DEFAULT))
    ref = lowo.summary(lowo.lowo(wells, lowo.PYCYTOMINER))
    assert set(ours) == set(ref)
    for key, (hit, n) in ref.items():
        assert ours[key][1] == n  # the same queries
        assert ours[key][0] >= hit, key
    assert ours["NSC:all"] == (53, 56) and ref["NSC:all"] == (36, 56)
    assert ours["NSCB:all"] == (30, 32) and ref["NSCB:all"] == (29, 32)


def test_harness_pipeline_is_celldino_profile(wells, lowo):
    """The harness's DEFAULT fitted on every row is what `celldino profile` makes by default
    (profile.recipe=auto on CellProfiler names), controls all used."""
    from celldino.config import ProfileConfig
    from celldino.pp.recipe import process

    every = np.ones(wells.n_obs, bool)
    ours = lowo.apply(wells, lowo.DEFAULT, every)
    cfg = dataclasses.replace(ProfileConfig(), fit_controls="all")
    theirs = process(wells.copy(), cfg)
    assert list(theirs.var_names) == list(ours.var_names)
    np.testing.assert_allclose(np.asarray(theirs.X), np.asarray(ours.X), rtol=1e-9, atol=1e-9)
