"""`celldino profile` end to end: shards in, .h5ad + Parquet + CSV out, cache reused."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from celldino import cli
from celldino.config import ProfileConfig
from celldino.io.profiles import read_h5ad
from celldino.pp import history, run_profile


def _write_shards(folder, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for plate in ("P1", "P2"):
        for w in range(8):
            for site in (1, 2):
                for _c in range(5):
                    rows.append(
                        (
                            plate,
                            f"A{w:02d}",
                            site,
                            "control" if w < 3 else "trt",
                            "DMSO" if w < 3 else f"cpd{w % 3}",
                        )
                    )
    df = pd.DataFrame(
        rows,
        columns=[
            "Metadata_Plate",
            "Metadata_Well",
            "Metadata_Site",
            "Metadata_pert_type",
            "Metadata_Compound",
        ],
    )
    for j in range(8):
        df[f"emb_{j:04d}"] = rng.normal(size=len(df)).astype(np.float32)
    folder.mkdir()
    for i, part in enumerate(np.array_split(np.arange(len(df)), 2)):
        df.iloc[part].to_parquet(folder / f"part-{i}.parquet", index=False)
    return df


def test_profile_command_writes_all_formats(tmp_path, capsys):
    df = _write_shards(tmp_path / "emb")
    out = tmp_path / "prof" / "wells.h5ad"
    args = [
        "profile",
        f"profile.input=[{tmp_path / 'emb'}]",
        f"profile.out={out}",
        "profile.via=[Metadata_Site]",
        "profile.consensus=[Metadata_Compound]",
        "profile.select=[variance]",
        # explicit step settings override the recipe (its defaults: tests/test_pp_recipe.py)
        "profile.normalize=mad_robustize",
        "profile.clip=0",
        "profile.sphere=none",
    ]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out.split()
    for name in ("wells.h5ad", "wells.parquet", "wells.csv", "wells.consensus.h5ad"):
        assert str(out.with_name(name)) in printed
    adata = read_h5ad(out)
    assert adata.shape == (16, 8)
    steps = [s["step"] for s in history(adata)]
    assert steps == [
        *("aggregate", "nonfinite", "annotate", "recipe", "fit_controls"),
        *("normalize", "feature_select"),
    ]
    # MAD-robustised against the half of each plate's controls it was fitted on (marked in
    # Metadata_celldino_fit_control, profile.fit_controls=half): their medians are 0
    table = pd.read_parquet(out.with_name("wells.parquet"))
    ctrl = table[table["Metadata_celldino_fit_control"]]
    assert set(ctrl["Metadata_pert_type"]) == {"control"}
    med = ctrl.groupby("Metadata_Plate")[[f"emb_{j:04d}" for j in range(8)]].median()
    np.testing.assert_allclose(med.to_numpy(), 0, atol=1e-9)
    # the CSV holds the same numbers
    csv = pd.read_csv(out.with_name("wells.csv"))
    np.testing.assert_allclose(csv["emb_0003"], table["emb_0003"], atol=1e-9)
    cons = read_h5ad(out.with_name("wells.consensus.h5ad"))
    assert sorted(cons.obs["Metadata_Compound"]) == ["DMSO", "cpd0", "cpd1", "cpd2"]
    assert len(df) == int(adata.obs["Metadata_Count_Cells"].sum())

    # a rerun with other normalisation reuses the cached aggregation
    cache = out.with_name("wells.aggregated.h5ad")
    mtime = cache.stat().st_mtime_ns
    assert cli.main([*args, "profile.normalize=standardize"]) == 0
    assert cache.stat().st_mtime_ns == mtime


def test_profile_command_reports_plate_without_controls(tmp_path):
    df = _write_shards(tmp_path / "emb")
    df.loc[df["Metadata_Plate"] == "P2", "Metadata_pert_type"] = "trt"
    for p in (tmp_path / "emb").glob("*.parquet"):
        p.unlink()
    df.to_parquet(tmp_path / "emb" / "all.parquet", index=False)
    rc = cli.main(
        ["profile", f"profile.input=[{tmp_path / 'emb'}]", f"profile.out={tmp_path / 'p.h5ad'}"]
    )
    assert rc == 2
    cfg = ProfileConfig(input=(str(tmp_path / "emb"),), out=str(tmp_path / "q.h5ad"))
    with pytest.raises(ValueError, match="Metadata_Plate 'P2' has no control profiles"):
        run_profile(cfg)


# ---- real inputs as they come: feature tokens, infer, CellProfiler / cytotable tables --------

COMPARTMENTS = ("Cells", "Cytoplasm", "Nuclei")


def _cytotable_cells(n_wells: int = 6, cells: int = 5, seed: int = 0) -> pd.DataFrame:
    """Per-cell table named as cytotable writes CellProfiler output: Image_Metadata_Plate /
    _Well from the image table, Metadata_ImageNumber / ObjectNumber ids, Image_Count_Cells
    (per image, repeated on every cell), and <Compartment>_<measurement> features."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in ("SQ1", "SQ2"):
        for w in range(n_wells):
            for c in range(cells):
                rows.append((p, f"B{w:02d}", w + 1, c + 1, "control" if w < 2 else "trt"))
    df = pd.DataFrame(
        rows,
        columns=[
            "Image_Metadata_Plate",
            "Image_Metadata_Well",
            "Metadata_ImageNumber",
            "Metadata_ObjectNumber",
            "Metadata_pert_type",
        ],
    )
    df["Image_Count_Cells"] = cells
    for comp in COMPARTMENTS:
        for m in ("AreaShape_Area", "Intensity_MeanIntensity_DNA", "Texture_Contrast_RNA_3"):
            df[f"{comp}_{m}"] = rng.normal(size=len(df))
    return df


def _profile(tmp_path, *args: str) -> tuple[int, str]:
    return cli.main(["profile", f"profile.out={tmp_path / 'out' / 'p.h5ad'}", *args])


def test_feature_tokens_are_names_or_prefixes_and_yaml_lists(tmp_path):
    df = _cytotable_cells()
    df.to_parquet(tmp_path / "cells.parquet", index=False)
    src = f"profile.input={tmp_path / 'cells.parquet'}"
    rc = _profile(
        tmp_path,
        src,
        "profile.features=Cells_,Nuclei_AreaShape_Area",
        "profile.normalize=none",
    )
    assert rc == 0
    adata = read_h5ad(tmp_path / "out" / "p.h5ad")
    want = [c for c in df.columns if c.startswith("Cells_")] + ["Nuclei_AreaShape_Area"]
    assert list(adata.var_names) == want  # token by token, each in table order
    # YAML lists in a config file, for features and every list setting
    (tmp_path / "c.yaml").write_text(
        "profile:\n  features: [Cytoplasm_, Nuclei_]\n"
        "  by: [Metadata_Plate, Metadata_Well]\n  normalize: none\n"
    )
    rc = cli.main(["profile", str(tmp_path / "c.yaml"), src, f"profile.out={tmp_path / 'y.h5ad'}"])
    assert rc == 0
    adata = read_h5ad(tmp_path / "y.h5ad")
    assert list(adata.var_names) == [
        c for c in df.columns if c.startswith(("Cytoplasm_", "Nuclei_"))
    ]


def test_cytotable_per_cell_parquet_profiles_as_pycytominer_aggregates(tmp_path):
    """A per-cell CellProfiler table in cytotable's naming, given as it is: features=infer
    (the default) takes the three compartments, Image_Metadata_Plate/_Well are read as
    Metadata_Plate/_Well, and the well means equal pycytominer's aggregate."""
    from pycytominer import aggregate as pyc_aggregate
    from pycytominer.cyto_utils import infer_cp_features

    df = _cytotable_cells()
    df.to_parquet(tmp_path / "cells.parquet", index=False)
    rc = _profile(tmp_path, f"profile.input={tmp_path / 'cells.parquet'}", "profile.recipe=none")
    assert rc == 0
    adata = read_h5ad(tmp_path / "out" / "p.h5ad")
    feats = infer_cp_features(df)
    assert list(adata.var_names) == feats  # Image_Count_Cells is not a feature (as pycytominer)
    strata = ["Image_Metadata_Plate", "Image_Metadata_Well"]
    ref = pyc_aggregate(df, strata=strata, features=feats, operation="mean")
    ref = ref.sort_values(strata).reset_index(drop=True)
    np.testing.assert_allclose(adata.X, ref[feats].to_numpy(), rtol=1e-12)
    obs = adata.obs.reset_index(drop=True)
    assert list(obs["Metadata_Plate"]) == list(ref["Image_Metadata_Plate"])
    assert list(obs["Metadata_Well"]) == list(ref["Image_Metadata_Well"])
    assert (obs["Metadata_Count_Cells"] == 5).all()
    assert "Metadata_pert_type" in obs  # constant per well: carried


def test_infer_agrees_with_pycytominer_on_lincs_and_takes_per_well_tables_as_profiles(
    lincs_csv, tmp_path, capsys
):
    """The real LINCS plate (per-well, csv.gz): infer picks pycytominer's features; each
    (plate, well) is one row, so the rows are the profiles (identity, logged), not refused."""
    from pycytominer.cyto_utils import infer_cp_features

    src = pd.read_csv(lincs_csv)
    rc = _profile(
        tmp_path, f"profile.input={lincs_csv}", "profile.features=infer", "profile.recipe=none"
    )
    assert rc == 0
    assert "aggregation is the identity" in capsys.readouterr().err
    adata = read_h5ad(tmp_path / "out" / "p.h5ad")
    feats = infer_cp_features(src)
    assert sorted(adata.var_names) == sorted(feats) and len(feats) == 454
    src = src.set_index(["Metadata_Plate", "Metadata_Well"])
    obs = adata.obs
    rows = src.loc[list(zip(obs["Metadata_Plate"], obs["Metadata_Well"]))]
    np.testing.assert_allclose(adata.X, rows[list(adata.var_names)].to_numpy(), rtol=1e-12)
    assert "Metadata_Count_Cells" not in obs  # no cell count is made up for a table of wells
