"""The profile recipe's steps against independent computations, and the presets as documented.

Floored normalisation and clipping against numpy by hand; drop_outliers and the blocklist
against pycytominer; replicate selection against a per-feature loop; shrunk sphering against
sklearn's OAS covariance and scipy's matrix square root; Harmony in the recipe against
harmonypy run by hand on the same principal components.
"""

from __future__ import annotations

import dataclasses
import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from celldino import pp
from celldino.config import ProfileConfig
from celldino.pp.presets import PRESETS, pick, resolve
from celldino.pp.recipe import process

CTRL = "Metadata_pert_type == 'control'"


def _wells(n_plates=2, n_ctrl=8, n_trt=16, d=12, seed=0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    rows, X = [], []
    for p in range(n_plates):
        shift = rng.normal(scale=2.0, size=d)  # a plate effect
        for w in range(n_ctrl + n_trt):
            ctrl = w < n_ctrl
            rows.append(
                {
                    "Metadata_Plate": f"P{p}",
                    "Metadata_Well": f"W{w:02d}",
                    "Metadata_Batch": f"B{p}",
                    "Metadata_pert_type": "control" if ctrl else "trt",
                    "Metadata_Compound": "DMSO" if ctrl else f"c{w % 4}",
                }
            )
            X.append(shift + rng.normal(size=d) + (0 if ctrl else 3.0 * (w % 4 == 0)))
    a = ad.AnnData(np.array(X), obs=pd.DataFrame(rows))
    a.obs_names = [f"w{i}" for i in range(a.n_obs)]
    a.var_names = [f"Cells_F{j}" for j in range(d)]
    return a


# ---- normalisation ------------------------------------------------------------------------


@pytest.mark.parametrize("floor", [0.1, 1.0])
def test_floored_mad_by_hand_and_constant_features_dropped(caplog, floor):
    a = _wells()
    X0 = np.asarray(a.X).copy()
    ctrl = (a.obs["Metadata_pert_type"] == "control").to_numpy()
    X0[ctrl, 0] = 5.0  # constant in the controls, varies in treated wells: MAD 0
    X0[:, 1] = 7.0  # constant everywhere: dropped
    a.X = X0.copy()
    with caplog.at_level(logging.WARNING, logger="celldino"):
        pp.normalize(a, method="mad_robustize", controls=CTRL, scale_floor=floor)
    assert "dropped 1 of 12 features that are constant" in caplog.text
    assert "Cells_F1" not in a.var_names and a.n_vars == 11
    keep = [j for j in range(12) if j != 1]
    for plate in ("P0", "P1"):
        rows = (a.obs["Metadata_Plate"] == plate).to_numpy()
        ref, grp = X0[rows & ctrl][:, keep], X0[rows][:, keep]
        med = np.median(ref, axis=0)
        mad = 1.4826 * np.median(np.abs(ref - med), axis=0)
        mad = np.where(mad == 0, ref.std(axis=0), mad)  # MAD 0 → the controls' std (also 0)
        spread = 1.4826 * np.median(np.abs(grp - np.median(grp, axis=0)), axis=0)
        scale = np.maximum(mad, floor * spread)
        np.testing.assert_allclose(a.X[rows], (grp - med) / scale, rtol=1e-12)
    # the near-constant feature stays on the scale of the others instead of × 1e18
    assert np.abs(a.X[:, 0]).max() < 100
    # pycytominer's arithmetic (scale_floor=0) divides it by epsilon, with a warning
    b = _wells()
    b.X = X0.copy()
    pp.normalize(b, method="mad_robustize", controls=CTRL, scale_floor=0)
    assert np.abs(b.X[:, 0]).max() > 1e15


def test_clip_by_hand():
    a = _wells()
    a.X[0, 0], a.X[1, 1] = 80.0, -60.0
    out = pp.clip(a, limit=50, copy=True)
    np.testing.assert_array_equal(out.X, np.clip(a.X, -50, 50))
    assert pp.history(out)[-1]["params"] == {"limit": 50, "n_clipped": 2}


# ---- feature selection --------------------------------------------------------------------


def test_drop_outliers_and_default_blocklist_match_pycytominer():
    from pycytominer import feature_select as pyc_select
    from pycytominer.cyto_utils.blocklist import Blocklist

    rng = np.random.default_rng(1)
    blocked = Blocklist("default").to_list()[:3]
    feats = [f"Cells_F{j}" for j in range(8)] + blocked
    df = pd.DataFrame(rng.normal(size=(40, len(feats))), columns=feats)
    df.iloc[3, 2], df.iloc[5, 6] = 900.0, -700.0  # two outlier features
    for op in ("drop_outliers", "blocklist"):
        ref = pyc_select(df, features=feats, operation=op, outlier_cutoff=500)
        a = ad.AnnData(df.to_numpy())
        a.var_names = feats
        pp.feature_select(a, operations=[op], outlier_cutoff=500)
        assert list(a.var_names) == list(ref.columns), op


def test_replicate_selection_by_hand():
    rng = np.random.default_rng(2)
    groups = np.repeat(np.arange(10), 3)
    signal = rng.normal(size=(10, 1))[groups]
    X = np.hstack([signal + 0.2 * rng.normal(size=(30, 1)), rng.normal(size=(30, 2))])
    a = ad.AnnData(X, obs=pd.DataFrame({"Metadata_Compound": [f"c{g}" for g in groups]}))
    a.var_names = ["good", "noise1", "noise2"]
    from celldino.pp.feature_select import replicate_correlation

    corr = replicate_correlation(X, groups)
    for j in range(3):  # correlation of each value with the mean of its other replicates
        others = np.array(
            [X[(groups == groups[i]) & (np.arange(30) != i), j].mean() for i in range(30)]
        )
        np.testing.assert_allclose(corr[j], np.corrcoef(X[:, j], others)[0, 1], rtol=1e-10)
    pp.feature_select(
        a, operations=["replicate"], replicate_key=["Metadata_Compound"], replicate_threshold=0.5
    )
    assert list(a.var_names) == ["good"]


# ---- sphering -----------------------------------------------------------------------------


def test_shrunk_zca_is_the_inverse_square_root_of_sklearns_oas_covariance():
    from scipy.linalg import sqrtm
    from sklearn.covariance import OAS

    a = _wells(n_ctrl=20, d=10)
    ctrl = (a.obs["Metadata_pert_type"] == "control").to_numpy()
    X = np.asarray(a.X).copy()
    out = pp.sphere(a, method="ZCA", shrinkage="oas", controls=CTRL, copy=True)
    ref = X[ctrl]
    mean = ref.mean(axis=0)
    cov = OAS().fit(ref).covariance_
    W = np.real(np.linalg.inv(sqrtm(cov)))
    np.testing.assert_allclose(out.X, (X - mean) @ W, atol=1e-8)


def test_fewer_controls_than_features_do_not_amplify_null_directions():
    """6 controls in 40 features: the controls span 5 directions. A direction they never
    varied in is scaled by at most 1/sqrt(a * mean eigenvalue) (a: the OAS intensity), i.e. at
    most 1/sqrt(a) times what a direction of typical control variance gets; pycytominer's
    epsilon estimator scales it by 1/(smallest kept singular value), many times more."""
    from sklearn.covariance import OAS

    rng = np.random.default_rng(4)
    d, n = 40, 6
    basis = np.linalg.qr(rng.normal(size=(d, d)))[0]
    ctrl = rng.normal(size=(n, 5)) * [5, 3, 2, 1, 0.5] @ basis[:, :5].T  # (n, d)
    null = basis[:, 10]  # a unit direction the controls never varied in
    X = np.vstack([ctrl, ctrl.mean(axis=0) + null])
    obs = pd.DataFrame({"Metadata_pert_type": ["control"] * n + ["trt"]})
    a = ad.AnnData(X, obs=obs)
    out = pp.sphere(a, method="ZCA", shrinkage="oas", controls=CTRL, copy=True)
    est = OAS().fit(ctrl)
    centred = ctrl - ctrl.mean(axis=0)
    mean_eig = np.trace(centred.T @ centred / n) / d  # the typical variance per direction
    gain = np.linalg.norm(out.X[-1])  # |W null|, null of unit length
    assert gain * np.sqrt(mean_eig) <= 1 / np.sqrt(est.shrinkage_) + 1e-9
    np.testing.assert_allclose(gain, 1 / np.sqrt(est.shrinkage_ * mean_eig), rtol=1e-9)
    old = pp.sphere(a, method="ZCA", shrinkage=None, epsilon=1e-6, controls=CTRL, copy=True)
    assert np.linalg.norm(old.X[-1]) > 3 * gain


# ---- presets ------------------------------------------------------------------------------


def test_presets_resolve_as_documented():
    cp = ["Cells_AreaShape_Area", "Nuclei_Intensity_X", "Cytoplasm_Y"]
    assert pick(cp) == "cellprofiler" and pick([f"CP_{f}" for f in cp]) == "cellprofiler"
    assert pick(["emb_0000", "emb_0001"]) == "embeddings"
    auto = resolve(ProfileConfig(), cp)
    assert auto.recipe == "cellprofiler"
    assert (auto.normalize, auto.normalize_floor, auto.clip) == ("mad_robustize", 1.0, 30.0)
    assert auto.normalize_floor_reference == "controls"
    assert auto.select == ("frequency", "drop_na", "drop_outliers", "blocklist")
    assert (auto.sphere, auto.sphere_shrinkage, auto.inverse_normal) == ("ZCA", "ratio", False)
    # one sphering per batch when there is a batch column, else one over all profiles
    assert auto.sphere_by == ""
    batch = resolve(ProfileConfig(), cp, columns=["Metadata_Plate", "Metadata_Batch"])
    assert batch.sphere_by == "Metadata_Batch"
    forced = ProfileConfig(sphere_by="global")
    assert resolve(forced, cp, columns=["Metadata_Batch"]).sphere_by == ""
    emb = resolve(ProfileConfig(), ["emb_0000"])
    assert (emb.recipe, emb.normalize, emb.select, emb.sphere) == (
        "embeddings",
        "standardize",
        (),
        "none",
    )
    none = resolve(ProfileConfig(recipe="none"), cp)
    assert (none.normalize, none.select, none.sphere, none.clip) == ("none", (), "none", 0.0)
    # explicit settings win; 'recipe' inside select expands to the preset's list
    mine = ProfileConfig(
        normalize="standardize",
        normalize_floor=0.0,
        clip=0.0,
        select=("recipe", "replicate"),
        sphere="PCA",
        sphere_shrinkage="none",
    )
    r = resolve(mine, cp)
    assert (r.normalize, r.normalize_floor, r.clip, r.sphere) == ("standardize", 0.0, 0.0, "PCA")
    assert r.select == (*PRESETS["cellprofiler"]["select"], "replicate")
    assert r.sphere_shrinkage is None
    # the preset's sphering needs controls: skipped without, an explicit one is kept
    assert resolve(ProfileConfig(), cp, has_controls=False).sphere == "none"


def test_default_recipe_runs_the_documented_chain_and_records_it():
    a = _wells(d=12)
    X0 = np.asarray(a.X).copy()
    out = process(a, ProfileConfig(controls=CTRL))
    hist = pp.history(out)
    assert [s["step"] for s in hist] == [
        "nonfinite",
        "annotate",
        "recipe",
        "fit_controls",
        "normalize",
        "feature_select",
        "clip",
        "sphere",
    ]
    rec = hist[2]["params"]
    assert rec["recipe"] == "cellprofiler" and rec["requested"] == "auto"
    # the same chain by hand with the library calls
    # (profile.fit_controls=split: X is fitted on every control, all marked True)
    fit = out.obs["Metadata_celldino_fit_control"].to_numpy(bool)
    assert (fit == out.obs["Metadata_celldino_control"].to_numpy(bool)).all()
    b = ad.AnnData(X0, obs=a.obs.drop(columns=["Metadata_celldino_control"]).copy())
    b.var_names = [f"Cells_F{j}" for j in range(12)]
    pp.annotate(b, controls=CTRL)
    pp.normalize(
        b, method="mad_robustize", scale_floor=1.0, floor_reference="controls", controls=fit
    )
    pp.feature_select(b, operations=["frequency", "drop_na", "drop_outliers", "blocklist"])
    pp.clip(b, limit=30)
    by = "Metadata_Batch" if "Metadata_Batch" in b.obs else None  # one sphering per batch
    pp.sphere(b, method="ZCA", shrinkage="ratio", controls=fit, by=by)
    np.testing.assert_allclose(out.X, b.X, atol=1e-10)


def test_harmony_in_the_recipe_runs_on_principal_components_as_harmonypy():
    import harmonypy
    from sklearn.decomposition import PCA

    a = _wells(n_plates=2, n_ctrl=8, n_trt=24, d=12)
    cfg = ProfileConfig(controls=CTRL, recipe="none", harmony_key="Metadata_Batch", harmony_pcs=5)
    out = process(a.copy(), cfg)
    assert list(out.var_names) == [f"PC{i}" for i in range(1, 6)]
    pcs = PCA(n_components=5, svd_solver="full").fit_transform(np.asarray(a.X))
    ho = harmonypy.run_harmony(
        pcs,
        a.obs[["Metadata_Batch"]].astype(str),
        "Metadata_Batch",
        theta=2.0,
        sigma=0.1,
        max_iter_harmony=10,
        random_state=0,
        verbose=False,
    )
    Z = np.asarray(ho.Z_corr)
    Z = Z if Z.shape == pcs.shape else Z.T
    np.testing.assert_allclose(out.X, Z, atol=1e-6)


def test_recipe_none_leaves_profiles_unchanged():
    a = _wells()
    X0 = np.asarray(a.X).copy()
    out = process(a, dataclasses.replace(ProfileConfig(controls=CTRL), recipe="none"))
    np.testing.assert_array_equal(out.X, X0)


@pytest.mark.parametrize("value", ["1.5", "lots"])
def test_bad_shrinkage_is_refused_naming_the_setting(value):
    from celldino.errors import DataError

    with pytest.raises(DataError, match="profile.sphere_shrinkage"):
        process(_wells(), ProfileConfig(controls=CTRL, sphere_shrinkage=value))


def test_the_floored_count_is_the_features_whose_scale_the_floor_raised():
    """n_floored counts features whose control scale was below the floor, by hand: a feature
    with zero control std (floored) counts, one whose control MAD is 0 but std is large (the
    std fallback is above the floor) does not."""
    from celldino.pp.normalize import _fit_floored

    ref = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 10.0]])  # 4 controls
    group = np.vstack([ref, [[3.0, 0.0], [5.0, 0.0]]])
    _, scale, n = _fit_floored(ref, group, "standardize", 1.0)
    # both features' group MAD is 0 (four of six values tie), so the group spread is their std
    assert n == 1 and scale[0] == group[:, 0].std() and scale[1] == ref[:, 1].std()
    _, scale, n = _fit_floored(ref, group, "mad_robustize", 0.1)
    assert n == 1 and scale[1] == ref[:, 1].std()  # MAD 0 → std 4.33, above 0.1 × spread


def test_control_floor_falls_back_to_the_plate_spread_when_controls_never_vary():
    """floor_reference='controls' floors at the median control MAD over plates; with one control
    well per plate that is 0 everywhere, and the plate's spread ('all') must take over instead of
    leaving the features unscaled. With varying controls it is the median of the plates' control
    MADs, by hand."""
    rng = np.random.default_rng(5)
    rows = [(p, "control" if w == 0 else "trt") for p in ("P1", "P2") for w in range(8)]
    obs = pd.DataFrame(rows, columns=["Metadata_Plate", "Metadata_pert_type"])
    X = rng.normal(size=(16, 4)) * [1.0, 10.0, 100.0, 0.1]
    a = ad.AnnData(X, obs=obs)
    a.var_names = [f"Cells_F{j}" for j in range(4)]
    ctrl = (obs["Metadata_pert_type"] == "control").to_numpy()
    ours = pp.normalize(a, controls=ctrl, scale_floor=1.0, floor_reference="controls", copy=True)
    plate = pp.normalize(a, controls=ctrl, scale_floor=1.0, floor_reference="all", copy=True)
    np.testing.assert_allclose(ours.X, plate.X)
    # three controls per plate: scale = max(plate's control MAD, median over plates of it)
    ctrl3 = (np.arange(16) % 8) < 3
    got = pp.normalize(a, controls=ctrl3, scale_floor=1.0, floor_reference="controls", copy=True)
    mad = [
        1.4826 * np.median(np.abs(X[r] - np.median(X[r], 0)), 0)
        for r in (ctrl3 & (np.arange(16) < 8), ctrl3 & (np.arange(16) >= 8))
    ]
    floor = np.median(np.vstack(mad), axis=0)
    for k, r in enumerate((np.arange(16) < 8, np.arange(16) >= 8)):
        c = np.median(X[r & ctrl3], axis=0)
        np.testing.assert_allclose(got.X[r], (X[r] - c) / np.maximum(mad[k], floor))
