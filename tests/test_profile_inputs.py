"""Inputs taken for what they are, and activity scored against controls nothing was fitted on.

- Already-normalised input (pp/inputs.py): the real LINCS plate (pycytominer's
  mad_robustize + feature selection) is recognised by its name and by its values and passes
  through `celldino profile` unchanged; the raw BBBC021 per-well CellProfiler means are not;
  an explicit normalisation still runs (its fitted controls' medians are 0, by numpy).
- The control split (pp/fit_split.py): ceil(n/2) controls per plate fit (at least 3),
  independent of row order; evaluate's activity drops them from the negatives, checked against average precision
  computed here by hand with numpy.
"""

from __future__ import annotations

import dataclasses
import math

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from celldino.config import EvaluateConfig, ProfileConfig
from celldino.eval.activity import phenotypic_activity
from celldino.eval.spec import NotEvaluable
from celldino.pp.fit_split import FIT_COLUMN, split_controls
from celldino.pp.inputs import already_normalized, value_evidence
from celldino.pp.recipe import process, run_profile
from celldino.pp.steps import history

CTRL = "Metadata_pert_type == 'control'"


def _anndata(df: pd.DataFrame) -> ad.AnnData:
    feats = [c for c in df.columns if not c.startswith("Metadata_")]
    meta = df[[c for c in df.columns if c.startswith("Metadata_")]].copy()
    for c in meta.columns:
        if meta[c].dtype == object:
            meta[c] = meta[c].astype(str)
    a = ad.AnnData(df[feats].to_numpy(float), obs=meta.reset_index(drop=True))
    a.obs_names = (meta["Metadata_Plate"] + "_" + meta["Metadata_Well"]).tolist()
    a.var_names = feats
    return a


@pytest.fixture(scope="module")
def lincs(shared_data) -> tuple[str, pd.DataFrame]:
    path = shared_data / "lincs_SQ00015054" / "SQ00015054_normalized_feature_select.csv.gz"
    return str(path), pd.read_csv(path)


@pytest.fixture(scope="module")
def bbbc(shared_data) -> pd.DataFrame:
    return pd.read_csv(shared_data / "bbbc021_profiles" / "bbbc021_per_well_odd_weeks.csv.gz")


# ---- already-normalised input ----------------------------------------------------------------


def test_lincs_table_passes_through_profile_unchanged(lincs, tmp_path):
    """`celldino profile` on pycytominer's table, every step setting default: the written
    profiles hold the file's numbers exactly, and the recipe record says why."""
    path, df = lincs
    cfg = ProfileConfig(
        input=(path,),
        out=str(tmp_path / "lincs.h5ad"),
        by=("Metadata_Plate", "Metadata_Well"),
        controls=CTRL,
        formats=("h5ad", "parquet"),
    )
    run_profile(cfg)
    out = pd.read_parquet(tmp_path / "lincs.parquet")
    feats = [c for c in df.columns if not c.startswith("Metadata_")]
    assert [c for c in out.columns if not c.startswith("Metadata_")] == feats
    key = ["Metadata_Plate", "Metadata_Well"]
    merged = df[key + feats].merge(out[key + feats], on=key, suffixes=("", "_out"))
    assert len(merged) == len(df) == 384
    np.testing.assert_array_equal(
        merged[feats].to_numpy(), merged[[f + "_out" for f in feats]].to_numpy()
    )
    # nothing was fitted here, and the table's own normalisation is unknown: no marks
    assert FIT_COLUMN not in out.columns
    adata = ad.read_h5ad(tmp_path / "lincs.h5ad")
    done = [s["step"] for s in history(adata)]
    assert not {"normalize", "feature_select", "clip", "sphere"} & set(done)
    rec = next(s["params"] for s in history(adata) if s["step"] == "recipe")
    assert rec["input"]["already_normalized"] is True
    assert (rec["normalize"], rec["sphere"], rec["clip"], rec["select"]) == ("none", "none", 0, [])
    assert any("_normalized" in e for e in rec["input"]["evidence"])


def test_lincs_values_alone_are_recognised_and_bbbc021_raw_is_not(lincs, bbbc):
    """Rule (b) by itself, independent of the file name: LINCS's wells are centred with unit
    MAD (numpy: 100 % of features); BBBC021's raw means are not (under 50 % in every plate)."""
    _, df = lincs
    a = _anndata(df)
    X = a.X
    med = np.median(X, axis=0)
    mad = 1.4826 * np.median(np.abs(X - med), axis=0)
    assert np.mean((np.abs(med) < 0.1) & (mad >= 0.5) & (mad <= 2)) == 1.0  # by hand
    assert "100%" in value_evidence(a)
    state = already_normalized(a, sources=["plate.csv"])
    assert state.normalized and len(state.evidence) == 1
    b = _anndata(bbbc)
    b.obs["Metadata_celldino_control"] = (b.obs["Metadata_pert_type"] == "control").to_numpy()
    assert value_evidence(b) == ""
    assert not already_normalized(b, sources=["bbbc021_per_well_odd_weeks.csv.gz"]).normalized
    out = process(b.copy(), ProfileConfig(controls=CTRL))
    assert {"normalize", "sphere"} <= {s["step"] for s in history(out)}


def test_explicit_normalize_on_lincs_normalises_and_input_state_raw_runs_the_recipe(lincs):
    path, df = lincs
    a = _anndata(df)
    cfg = ProfileConfig(
        input=(path,), controls=CTRL, normalize="mad_robustize", fit_controls="half"
    )
    out = process(a.copy(), cfg)
    steps = [s["step"] for s in history(out)]
    assert "normalize" in steps and "sphere" not in steps  # explicit wins, the rest skipped
    fit = out.obs[FIT_COLUMN].to_numpy(bool)
    assert fit.sum() == 12  # half of the 24 DMSO wells
    # centred on the fitted controls: their median is 0 in every feature (numpy)
    np.testing.assert_allclose(np.median(out.X[fit], axis=0), 0, atol=1e-12)
    assert not np.allclose(out.X, a.X)
    raw = process(a.copy(), dataclasses.replace(cfg, normalize="", input_state="raw"))
    assert {"normalize", "feature_select", "sphere"} <= {s["step"] for s in history(raw)}


def test_celldino_marks_are_kept_when_its_output_is_profiled_again():
    a = _toy()
    first = process(a.copy(), ProfileConfig(controls=CTRL))
    marks = first.obs[FIT_COLUMN].to_numpy(bool).copy()
    assert marks.any()
    again = process(first.copy(), ProfileConfig(controls=CTRL))
    np.testing.assert_array_equal(again.obs[FIT_COLUMN].to_numpy(bool), marks)
    np.testing.assert_array_equal(again.X, first.X)  # recognised by its recorded steps


# ---- the control split -----------------------------------------------------------------------


def _toy(n_plates=3, n_ctrl=(5, 6, 7), n_cpd=4, reps=3, d=6, seed=0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    rows, X = [], []
    for p in range(n_plates):
        for w in range(n_ctrl[p]):
            rows.append((f"P{p}", f"C{w:02d}", "control", "DMSO"))
            X.append(rng.normal(size=d) * 0.3 + 5)
        for c in range(n_cpd):
            for r in range(reps):
                rows.append((f"P{p}", f"T{c}{r}", "trt", f"cpd{c}"))
                X.append(rng.normal(size=d) * 0.3 + 5 + (c == 0) * np.eye(d)[0] * 2)
    obs = pd.DataFrame(
        rows, columns=["Metadata_Plate", "Metadata_Well", "Metadata_pert_type", "Metadata_Compound"]
    )
    a = ad.AnnData(np.array(X), obs=obs)
    a.obs_names = (obs["Metadata_Plate"] + "_" + obs["Metadata_Well"]).tolist()
    a.var_names = [f"Cells_F{j}" for j in range(d)]
    return a


def test_split_is_half_per_plate_controls_only_and_row_order_free():
    a = _toy()
    a.obs["Metadata_celldino_control"] = (a.obs["Metadata_pert_type"] == "control").to_numpy()
    fit = split_controls(a, mode="half", by="Metadata_Plate")
    ctrl = a.obs["Metadata_celldino_control"].to_numpy()
    assert not (fit & ~ctrl).any()
    per_plate = pd.Series(fit).groupby(a.obs["Metadata_Plate"].to_numpy()).sum()
    assert per_plate.to_dict() == {f"P{p}": math.ceil(n / 2) for p, n in enumerate((5, 6, 7))}
    perm = np.random.default_rng(1).permutation(a.n_obs)
    fit_perm = split_controls(a[perm].copy(), mode="half", by="Metadata_Plate")
    np.testing.assert_array_equal(fit_perm, fit[perm])
    assert split_controls(a, mode="all").sum() == ctrl.sum()
    # at least 3 fit per plate (all of them below that): a MAD of 1 or 2 wells is degenerate
    b = _toy(n_ctrl=(2, 4, 8))
    b.obs["Metadata_celldino_control"] = (b.obs["Metadata_pert_type"] == "control").to_numpy()
    fit_b = split_controls(b, mode="half", by="Metadata_Plate")
    per_plate = pd.Series(fit_b).groupby(b.obs["Metadata_Plate"].to_numpy()).sum()
    assert per_plate.to_dict() == {"P0": 2, "P1": 3, "P2": 4}


def _ap_by_hand(X, pos: np.ndarray, neg: np.ndarray, q: int) -> float:
    """Average precision of query q: positives `pos`, negatives `neg` (index arrays) ranked by
    cosine similarity, ties with positives first (copairs' rule)."""
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    cand = np.concatenate([pos, neg])
    sim = (Xn[cand] @ Xn[q]).astype(np.float32)
    is_pos = np.r_[np.ones(len(pos), bool), np.zeros(len(neg), bool)]
    order = np.lexsort((~is_pos, -sim))
    hits = is_pos[order]
    ranks = np.flatnonzero(hits) + 1
    return float(np.mean(np.arange(1, len(ranks) + 1) / ranks))


def test_activity_negatives_exclude_the_fitted_controls_by_hand():
    a = _toy()
    prof = process(
        a.copy(), ProfileConfig(controls=CTRL, recipe="cellprofiler", fit_controls="half")
    )
    meta = prof.obs.reset_index(drop=True)
    X = np.asarray(prof.X)
    fit = meta[FIT_COLUMN].to_numpy(bool)
    ctrl = (meta["Metadata_pert_type"] == "control").to_numpy()
    assert fit.sum() == 3 + 3 + 4
    kw = {"by": ["Metadata_Compound"], "null_size": 200, "show_progress": False}
    _, maps, summary = phenotypic_activity(meta, X, **kw)
    assert summary["n_negatives"] == (ctrl & ~fit).sum() == 8
    assert summary["n_negatives_fitted"] == 0
    held = np.flatnonzero(ctrl & ~fit)
    for cpd, row in maps.set_index("Metadata_Compound").iterrows():
        members = np.flatnonzero((meta["Metadata_Compound"] == cpd).to_numpy())
        aps = [_ap_by_hand(X, members[members != q], held, q) for q in members]
        assert row["mean_average_precision"] == pytest.approx(np.mean(aps), abs=1e-6)
    # negatives=all: every control, the result flagged in-sample
    _, maps_all, s_all, st = phenotypic_activity(meta, X, negatives="all", return_stats=True, **kw)
    assert s_all["n_negatives"] == ctrl.sum() and s_all["n_negatives_fitted"] == fit.sum()
    assert st["flags"].startswith("in-sample: 10 of the 18 negative controls")
    every = np.flatnonzero(ctrl)
    members = np.flatnonzero((meta["Metadata_Compound"] == "cpd1").to_numpy())
    aps = [_ap_by_hand(X, members[members != q], every, q) for q in members]
    got = maps_all.set_index("Metadata_Compound").loc["cpd1", "mean_average_precision"]
    assert got == pytest.approx(np.mean(aps), abs=1e-6)


def test_activity_refuses_when_every_control_was_fitted_and_evaluate_says_which(tmp_path):
    from celldino.eval.runner import evaluate

    a = _toy()
    every = process(a.copy(), ProfileConfig(controls=CTRL, fit_controls="all"))
    meta = every.obs.reset_index(drop=True)
    with pytest.raises(NotEvaluable, match="profile.fit_controls=half"):
        phenotypic_activity(meta, every.X, by=["Metadata_Compound"], show_progress=False)
    # evaluate: held-out negatives by default, named in the metrics table
    half = process(a.copy(), ProfileConfig(controls=CTRL, fit_controls="half"))
    table = pd.concat(
        [half.obs.reset_index(drop=True), pd.DataFrame(half.X, columns=list(half.var_names))],
        axis=1,
    )
    table.to_csv(tmp_path / "p.csv", index=False)  # the marks as text True/False
    cfg = EvaluateConfig(out_dir=str(tmp_path / "ev"), null_size=100, n_boot=20)
    out = evaluate(tmp_path / "p.csv", spec={"analyses": ["activity"]}, cfg=cfg)
    m = pd.read_parquet(out / "metrics.parquet").set_index("metric")
    assert m.loc["n_negatives", "value"] == 8 and m.loc["n_negatives_fitted", "value"] == 0
    assert m.loc["mAP", "flags"] == ""
    cfg_all = dataclasses.replace(cfg, out_dir=str(tmp_path / "ev2"), activity_negatives="all")
    out2 = evaluate(tmp_path / "p.csv", spec={"analyses": ["activity"]}, cfg=cfg_all)
    m2 = pd.read_parquet(out2 / "metrics.parquet").set_index("metric")
    assert m2.loc["n_negatives", "value"] == 18 and "in-sample" in m2.loc["mAP", "flags"]


def test_split_default_profiles_on_every_control_and_activity_on_the_held_out_layer(tmp_path):
    """profile.fit_controls=split (the default): X is what fit_controls=all makes (the recipe
    chosen on BBBC021 with every control), the `activity` layer is what fit_controls=half makes
    on the same features, and evaluate scores the .h5ad's activity on that layer against the
    controls it was not fitted on (by hand: the same summary as phenotypic_activity on the
    half profiles)."""
    from celldino.eval.runner import evaluate
    from celldino.io.profiles import write_h5ad
    from celldino.pp.fit_split import ACTIVITY_FIT_COLUMN, ACTIVITY_LAYER

    a = _toy()
    split = process(a.copy(), ProfileConfig(controls=CTRL))
    every = process(a.copy(), ProfileConfig(controls=CTRL, fit_controls="all"))
    half = process(a.copy(), ProfileConfig(controls=CTRL, fit_controls="half"))
    np.testing.assert_allclose(split.X, every.X, atol=1e-12)
    assert list(split.var_names) == list(half.var_names)
    np.testing.assert_allclose(split.layers[ACTIVITY_LAYER], half.X, atol=1e-12)
    np.testing.assert_array_equal(
        split.obs[ACTIVITY_FIT_COLUMN].to_numpy(bool), half.obs[FIT_COLUMN].to_numpy(bool)
    )
    assert split.obs[FIT_COLUMN].to_numpy(bool).sum() == 18  # X: every control fitted
    write_h5ad(split, tmp_path / "p.h5ad")
    cfg = EvaluateConfig(out_dir=str(tmp_path / "ev"), null_size=100, n_boot=20)
    out = evaluate(tmp_path / "p.h5ad", spec={"analyses": ["activity"]}, cfg=cfg)
    m = pd.read_parquet(out / "metrics.parquet").set_index("metric")
    assert m.loc["n_negatives", "value"] == 8 and m.loc["n_negatives_fitted", "value"] == 0
    assert m.loc["mAP", "flags"] == ""
    kw = {"by": ["Metadata_Compound"], "null_size": 100, "show_progress": False}
    _, _, by_hand = phenotypic_activity(half.obs.reset_index(drop=True), half.X, **kw)
    assert m.loc["mAP", "value"] == pytest.approx(by_hand["mAP"], abs=1e-9)
