"""Profiling: DuckDB aggregation vs pandas, normalisation/sphering/selection vs pycytominer."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from celldino import pp
from celldino.io.profiles import frame_to_anndata, read_h5ad, read_profiles, write_h5ad

FEATS = [f"emb_{i:04d}" for i in range(6)]


def _cells(seed: int = 0, n: int = 600) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    plates = rng.choice(["P1", "P2"], n)
    wells = rng.choice(["A01", "A02", "B01"], n)
    df = pd.DataFrame(
        {
            "Metadata_Plate": plates,
            "Metadata_Well": wells,
            "Metadata_Site": rng.integers(1, 4, n),
            "Metadata_CellID": [f"c{i}" for i in range(n)],
            "Metadata_Compound": np.where(wells == "A01", "DMSO", "drugX"),
        }
    )
    for f in FEATS:
        df[f] = rng.normal(size=n).astype(np.float32)
    return df


@pytest.fixture()
def shards(tmp_path):
    df = _cells()
    for i, part in enumerate(np.array_split(np.arange(len(df)), 3)):
        df.iloc[part].to_parquet(tmp_path / f"shard_{i}.parquet", index=False)
    return tmp_path, df


@pytest.mark.parametrize("method", ["mean", "median"])
def test_aggregate_equals_pandas_groupby(shards, method):
    folder, df = shards
    keys = ["Metadata_Plate", "Metadata_Well"]
    adata = pp.aggregate(str(folder / "*.parquet"), by=keys, features="emb_", method=method)
    ref = getattr(df.groupby(keys)[FEATS], method)().reset_index().sort_values(keys)
    np.testing.assert_allclose(adata.X, ref[FEATS].to_numpy(np.float64), rtol=0, atol=1e-6)
    assert list(adata.obs["Metadata_Well"]) == list(ref["Metadata_Well"])
    assert list(adata.obs["Metadata_Count_Cells"]) == list(df.groupby(keys).size())
    # constant within wells → carried; varying (cell ids, sites) → not
    assert "Metadata_Compound" in adata.obs and "Metadata_CellID" not in adata.obs
    assert pp.steps(adata) == ["aggregate"]
    assert pp.history(adata)[0]["params"]["method"] == method


def test_aggregate_via_sites_weights_sites_equally(shards):
    folder, df = shards
    well, site = (
        ["Metadata_Plate", "Metadata_Well"],
        ["Metadata_Plate", "Metadata_Well", "Metadata_Site"],
    )
    adata = pp.aggregate(folder, by=well, features=FEATS, method="mean", levels=[site])
    per_site = df.groupby(site)[FEATS].mean().reset_index()
    ref = per_site.groupby(well)[FEATS].mean().reset_index()
    np.testing.assert_allclose(adata.X, ref[FEATS].to_numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="must contain every key"):
        pp.aggregate(folder, by=site, features=FEATS, levels=[well])


def test_aggregate_bad_keys_and_features(shards):
    folder, _ = shards
    with pytest.raises(ValueError, match="Metadata_Nope"):
        pp.aggregate(folder, by=["Metadata_Nope"], features="emb_")
    with pytest.raises(ValueError, match="no feature columns match"):
        pp.aggregate(folder, by=["Metadata_Plate"], features="CP_")


# ---- pycytominer equality on the real LINCS plate -----------------------------------------


@pytest.fixture(scope="module")
def lincs(lincs_csv):
    df = pd.read_csv(lincs_csv)
    feats = [c for c in df.columns if not c.startswith("Metadata_")]
    return df, feats


def test_mad_robustize_matches_pycytominer(lincs):
    from pycytominer import normalize as pyc_normalize

    df, feats = lincs
    query = "Metadata_pert_type == 'control'"
    ref = pyc_normalize(
        df,
        features=feats,
        meta_features=[c for c in df if c not in feats],
        samples=query,
        method="mad_robustize",
    )
    adata = frame_to_anndata(df, feats)
    # scale_floor=0 is pycytominer's arithmetic (MAD + epsilon) exactly
    pp.normalize(adata, method="mad_robustize", by=None, controls=query, scale_floor=0)
    np.testing.assert_allclose(adata.X, ref[feats].to_numpy(), rtol=0, atol=1e-6)
    # standardise against all wells equals sklearn (the scaler pycytominer uses)
    from sklearn.preprocessing import StandardScaler

    adata = frame_to_anndata(df, feats)
    pp.normalize(adata, method="standardize", by="Metadata_Plate", reference="all", scale_floor=0)
    np.testing.assert_allclose(
        adata.X, StandardScaler().fit_transform(df[feats].to_numpy()), atol=1e-6
    )


@pytest.mark.parametrize("method", ["ZCA", "PCA", "ZCA-cor"])
def test_sphere_matches_pycytominer(lincs, method):
    from pycytominer.operations import Spherize

    df, feats = lincs
    feats = feats[:40]  # full rank on the 384 wells; pycytominer refuses rank-deficient input
    query = "Metadata_pert_type != 'control'"  # 360 wells as the reference
    ref = Spherize(method=method, epsilon=1e-6, return_numpy=True).fit(df.query(query)[feats])
    expected = ref.transform(df[feats])
    adata = frame_to_anndata(df, feats)
    # shrinkage=None is pycytominer's estimator (epsilon on the singular values)
    pp.sphere(adata, method=method, epsilon=1e-6, shrinkage=None, controls=query)
    np.testing.assert_allclose(adata.X, expected, rtol=0, atol=1e-6)
    if method == "PCA":
        assert adata.var_names[0] == "PC1"


def test_feature_select_matches_pycytominer(lincs):
    from pycytominer import feature_select as pyc_select

    df, feats = lincs
    block = feats[:3]
    ops = ["variance_threshold", "frequency_threshold", "correlation_threshold", "blocklist"]
    # a lower correlation threshold so that correlation actually removes features here
    ref = pyc_select(
        df,
        features=feats,
        operation=ops,
        corr_threshold=0.5,
        blocklist=block,
        min_variance=0.5,
        unique_cut=0.5,
    )
    expected = [c for c in ref.columns if c in feats]
    out = frame_to_anndata(df, feats)
    pp.feature_select(
        out,
        operations=["variance", "frequency", "correlation", "blocklist"],
        corr_threshold=0.5,
        blocklist=block,
        min_variance=0.5,
        unique_cut=0.5,
    )
    assert 0 < len(expected) < len(feats) - 3
    assert list(out.var_names) == expected
    np.testing.assert_array_equal(out.X, df[expected].to_numpy())


# ---- synthetic checks -----------------------------------------------------------------------


def _profiles(seed=0, n_per_plate=40, d=5, plates=("P1", "P2")):
    rng = np.random.default_rng(seed)
    rows = []
    for p_i, plate in enumerate(plates):
        for k in range(n_per_plate):
            ctrl = k < n_per_plate // 2
            rows.append(
                {
                    "Metadata_Plate": plate,
                    "Metadata_Batch": f"B{p_i}",
                    "Metadata_pert_type": "control" if ctrl else "trt",
                    "Metadata_Compound": "DMSO" if ctrl else f"cpd{k % 4}",
                }
            )
    obs = pd.DataFrame(rows)
    A = rng.normal(size=(d, d))
    X = rng.normal(size=(len(obs), d)) @ A + 3 * (obs["Metadata_Batch"] == "B1").to_numpy()[:, None]
    df = obs.copy()
    for j in range(d):
        df[f"f{j}"] = X[:, j]
    return frame_to_anndata(df)


def test_whitening_makes_control_covariance_identity():
    adata = _profiles()
    pp.annotate(adata, controls=("Metadata_pert_type", "control"))
    out = pp.sphere(
        adata, method="ZCA", epsilon=0.0, shrinkage=None, by="Metadata_Batch", copy=True
    )
    ctrl = out.obs["Metadata_pert_type"].to_numpy() == "control"
    for b in ("B0", "B1"):
        Z = out.X[ctrl & (out.obs["Metadata_Batch"].to_numpy() == b)]
        np.testing.assert_allclose(np.cov(Z.T), np.eye(Z.shape[1]), atol=1e-8)
        np.testing.assert_allclose(Z.mean(axis=0), 0, atol=1e-8)


def test_singular_covariance_is_regularised_with_warning(caplog):
    adata = _profiles()
    adata.X[:, 4] = adata.X[:, 0] + adata.X[:, 1]  # linearly dependent feature
    with caplog.at_level(logging.WARNING, logger="celldino"):
        out = pp.sphere(
            adata,
            method="PCA",
            shrinkage=None,
            controls="Metadata_pert_type == 'control'",
            copy=True,
        )
    assert "singular" in caplog.text and "regularised" in caplog.text
    assert np.isfinite(out.X).all()


def test_controls_missing_errors_name_step_and_plate():
    adata = _profiles()
    with pytest.raises(ValueError, match="no controls found: pass controls=.* or run pp.annotate"):
        pp.normalize(adata, method="mad_robustize")
    adata.obs.loc[adata.obs["Metadata_Plate"] == "P2", "Metadata_pert_type"] = "trt"
    pp.annotate(adata, controls="Metadata_pert_type == 'control'")
    with pytest.raises(ValueError, match="Metadata_Plate 'P2' has no control profiles"):
        pp.normalize(adata, method="mad_robustize", by="Metadata_Plate")


def test_mad_per_plate_uses_each_plates_controls():
    adata = _profiles()
    X0 = np.asarray(adata.X).copy()
    pp.annotate(adata, controls="Metadata_pert_type == 'control'")
    # the control MAD itself (scale_floor=0; the floored scale: tests/test_pp_recipe.py)
    pp.normalize(adata, method="mad_robustize", by="Metadata_Plate", scale_floor=0)
    for plate in ("P1", "P2"):
        rows = (adata.obs["Metadata_Plate"] == plate).to_numpy()
        ctrl = rows & adata.obs["Metadata_celldino_control"].to_numpy()
        med = np.median(X0[ctrl], axis=0)
        mad = np.median(np.abs(X0[ctrl] - med), axis=0) * 1.4826
        np.testing.assert_allclose(adata.X[rows], (X0[rows] - med) / mad, atol=1e-12)
    assert pp.steps(adata) == ["annotate", "normalize"]


def test_harmony_matches_harmonypy():
    import harmonypy

    adata = _profiles(n_per_plate=60)
    X0 = np.asarray(adata.X).copy()
    pp.harmony(adata, key="Metadata_Batch", random_state=0)
    ho = harmonypy.run_harmony(
        X0,
        adata.obs[["Metadata_Batch"]].astype(str),
        "Metadata_Batch",
        random_state=0,
        verbose=False,
        ncores=1,
    )
    np.testing.assert_allclose(adata.X, np.asarray(ho.Z_corr), atol=1e-8)
    # the batch shift (3 units) shrinks
    b1 = (adata.obs["Metadata_Batch"] == "B1").to_numpy()
    gap0 = np.abs(X0[b1].mean(0) - X0[~b1].mean(0)).mean()
    gap1 = np.abs(adata.X[b1].mean(0) - adata.X[~b1].mean(0)).mean()
    assert gap1 < 0.7 * gap0


def test_harmony_on_pca_corrects_obsm_and_leaves_x():
    import harmonypy

    adata = _profiles(n_per_plate=60)
    X0 = np.asarray(adata.X).copy()
    with pytest.raises(ValueError, match="run pp.pca first"):
        pp.harmony(adata, key="Metadata_Batch", use_rep="X_pca")
    pp.pca(adata, n_components=4)
    pp.harmony(adata, key="Metadata_Batch", use_rep="X_pca", random_state=0)
    batch = adata.obs[["Metadata_Batch"]].astype(str)
    ho = harmonypy.run_harmony(
        adata.obsm["X_pca"], batch, "Metadata_Batch", random_state=0, verbose=False, ncores=1
    )
    np.testing.assert_allclose(adata.obsm["X_pca_harmony"], np.asarray(ho.Z_corr), atol=1e-8)
    np.testing.assert_array_equal(adata.X, X0)
    assert pp.history(adata)[-1]["params"]["use_rep"] == "X_pca"


def test_nonfinite_policies():
    adata = _profiles()
    adata.X[3, 2] = np.nan
    adata.X[5, 1] = np.inf
    with pytest.raises(ValueError, match=r"2 non-finite values .*f1 \(1\), f2 \(1\)"):
        pp.handle_nonfinite(adata, policy="error")
    out = pp.handle_nonfinite(adata, policy="drop_feature", copy=True)
    assert list(out.var_names) == ["f0", "f3", "f4"] and out.n_obs == adata.n_obs
    out = pp.handle_nonfinite(adata, policy="drop_row", copy=True)
    assert out.n_obs == adata.n_obs - 2 and out.n_vars == adata.n_vars
    assert pp.history(out)[-1]["params"]["n_nonfinite"] == 2


def test_inverse_normal_and_consensus():
    from scipy.stats import norm

    adata = _profiles()
    X0 = np.asarray(adata.X).copy()
    pp.inverse_normal(adata)
    # monotone per feature and centred on the normal median
    for j in range(X0.shape[1]):
        assert (
            np.argsort(adata.X[:, j], kind="stable") == np.argsort(X0[:, j], kind="stable")
        ).all()
    assert abs(np.median(adata.X[:, 0]) - norm.ppf(0.5)) < 0.05
    cons = pp.consensus(adata, by=["Metadata_Compound"], method="mean")
    ref = pd.DataFrame(adata.X).groupby(adata.obs["Metadata_Compound"].to_numpy()).mean()
    np.testing.assert_allclose(cons.X, ref.to_numpy(), atol=1e-12)
    assert list(cons.obs["Metadata_Compound"]) == sorted(ref.index)
    assert "Metadata_Plate" not in cons.obs  # varies within compound
    assert pp.steps(cons)[-1] == "consensus"


def test_h5ad_round_trip_keeps_steps(tmp_path):
    adata = _profiles()
    pp.annotate(adata, controls="Metadata_pert_type == 'control'")
    pp.normalize(adata, method="standardize", by="Metadata_Plate")
    path = write_h5ad(adata, tmp_path / "p.h5ad")
    back = read_h5ad(path)
    assert back.uns["celldino"]["steps"] == adata.uns["celldino"]["steps"]
    np.testing.assert_array_equal(back.X, adata.X)
    assert list(back.obs["Metadata_Plate"]) == list(adata.obs["Metadata_Plate"])
    again = read_profiles(path)
    assert pp.steps(again) == ["annotate", "normalize"]


def test_pca_on_controls_matches_sklearn():
    from sklearn.decomposition import PCA

    adata = _profiles()
    ctrl = (adata.obs["Metadata_pert_type"] == "control").to_numpy()
    X0 = np.asarray(adata.X).copy()
    pp.pca(adata, n_components=3, reference="controls", controls=ctrl)
    ref = PCA(n_components=3, svd_solver="full").fit(X0[ctrl])
    # scanpy's keys: the projection in obsm, the loadings in varm, the variances in uns
    np.testing.assert_allclose(adata.obsm["X_pca"], ref.transform(X0), atol=1e-10)
    np.testing.assert_allclose(adata.varm["PCs"], ref.components_.T, atol=1e-12)
    np.testing.assert_allclose(adata.uns["pca"]["variance_ratio"], ref.explained_variance_ratio_)
    np.testing.assert_allclose(adata.uns["pca"]["variance"], ref.explained_variance_)
    np.testing.assert_array_equal(adata.X, X0)  # X is left as it is
    assert adata.obsm["X_pca"].shape == (adata.n_obs, 3) and pp.steps(adata) == ["pca"]


def test_drop_na_matches_pycytominer(lincs):
    from pycytominer import feature_select as pyc_select

    df, feats = lincs
    df = df.copy()
    feats = feats[:20]
    df.loc[:30, feats[2]] = np.nan  # 31 of 384 rows missing: above the 5 % cutoff
    df.loc[:5, feats[4]] = np.nan  # 6 of 384: kept
    ref = pyc_select(df[feats], features=feats, operation="drop_na_columns", na_cutoff=0.05)
    out = frame_to_anndata(df, feats)
    pp.feature_select(out, operations=["drop_na"], na_cutoff=0.05)
    assert list(out.var_names) == list(ref.columns) and feats[2] not in out.var_names


def test_median_in_many_partitions_with_site_level(shards, monkeypatch):
    import sys

    folder, df = shards
    monkeypatch.setattr(sys.modules["celldino.pp.aggregate"], "PARTITION_BYTES", 2000.0)
    well = ["Metadata_Plate", "Metadata_Well"]
    site = [*well, "Metadata_Site"]
    adata = pp.aggregate(folder, by=well, features="emb_", method="median", levels=[site])
    ref = df.groupby(site)[FEATS].median().reset_index().groupby(well)[FEATS].median()
    np.testing.assert_allclose(adata.X, ref.to_numpy(np.float64), atol=1e-6)
    assert list(adata.obs["Metadata_Count_Cells"]) == list(df.groupby(well).size())
    assert list(adata.obs["Metadata_Compound"]) == list(
        df.groupby(well)["Metadata_Compound"].first()
    )


def test_groups_keep_a_missing_key_as_its_own_group():
    from celldino.pp.controls import groups

    df = pd.DataFrame({"Metadata_Plate": ["a", None, "a", None, "b"], "f": range(5)})
    adata = frame_to_anndata(df, ["f"])
    got = {("NaN" if pd.isna(v) else v): list(ix) for v, ix in groups(adata, "Metadata_Plate")}
    assert got == {"a": [0, 2], "NaN": [1, 3], "b": [4]}  # NaN rows are not lost


def test_profile_outputs_named_after_any_format(tmp_path):
    from celldino.pp.recipe import _outputs

    out = _outputs(tmp_path / "p.parquet", ("h5ad", "parquet", "csv"))
    assert [p.name for p in out.values()] == ["p.h5ad", "p.parquet", "p.csv"]
    assert _outputs(tmp_path / "p.h5ad", ("csv",), ".consensus")["csv"].name == "p.consensus.csv"


# ---- the scanpy convention: in place by default, copy=True leaves the input untouched ---------

IN_PLACE = {
    "annotate": lambda a, **kw: pp.annotate(a, controls="Metadata_pert_type == 'control'", **kw),
    "normalize": lambda a, **kw: pp.normalize(a, method="standardize", reference="all", **kw),
    "harmony": lambda a, **kw: pp.harmony(a, key="Metadata_Batch", nclust=2, **kw),
    "inverse_normal": lambda a, **kw: pp.inverse_normal(a, **kw),
    "nonfinite": lambda a, **kw: pp.handle_nonfinite(a, policy="drop_row", **kw),
    "pca": lambda a, **kw: pp.pca(a, n_components=2, **kw),
    "sphere": lambda a, **kw: pp.sphere(a, method="PCA", controls=("Metadata_Batch", "B0"), **kw),
    "feature_select": lambda a, **kw: pp.feature_select(
        a, operations=["blocklist"], blocklist=["f1"], **kw
    ),
}


@pytest.mark.parametrize("name", list(IN_PLACE))
def test_steps_modify_in_place_or_return_a_copy(name):
    step = IN_PLACE[name]
    adata = _profiles()
    if name == "nonfinite":
        adata.X[3, 2] = np.nan  # one row to drop
    before = adata.copy()
    out = step(adata, copy=True)
    assert out is not None and out is not adata and pp.steps(out) == [name]
    # the input is untouched
    assert adata.shape == before.shape
    np.testing.assert_array_equal(adata.X, before.X)
    assert list(adata.obs.columns) == list(before.obs.columns) and pp.steps(adata) == []
    assert step(adata) is None  # in place by default, as scanpy
    assert pp.steps(adata) == [name] and adata.shape == out.shape
    np.testing.assert_array_equal(adata.X, out.X)
    assert list(adata.var_names) == list(out.var_names)


def test_aggregate_keeps_unsigned_and_decimal_feature_columns(tmp_path):
    """uint32 (DuckDB UINTEGER) and DECIMAL feature columns are features, found by infer too:
    they were dropped silently from the profiles."""
    from decimal import Decimal

    import pyarrow as pa
    import pyarrow.parquet as pq

    df = _cells(n=60)
    area = np.arange(60, dtype=np.uint32) * 3
    table = pa.table(
        {
            "Metadata_Plate": df["Metadata_Plate"],
            "Metadata_Well": df["Metadata_Well"],
            "Cells_AreaShape_Area": pa.array(area, pa.uint32()),
            "Cells_Intensity_Mean": pa.array(
                [Decimal(f"{v:.3f}") for v in df[FEATS[0]]], pa.decimal128(9, 3)
            ),
        }
    )
    pq.write_table(table, tmp_path / "cells.parquet")
    keys = ["Metadata_Plate", "Metadata_Well"]
    adata = pp.aggregate(str(tmp_path / "cells.parquet"), by=keys, features="infer")
    assert list(adata.var_names) == ["Cells_AreaShape_Area", "Cells_Intensity_Mean"]
    ref = (
        pd.DataFrame({**{k: df[k] for k in keys}, "a": area.astype(float)})
        .groupby(keys)["a"]
        .mean()
    )
    np.testing.assert_allclose(adata.X[:, 0], ref.to_numpy(), rtol=1e-12)
