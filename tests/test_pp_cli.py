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
    ]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out.split()
    for name in ("wells.h5ad", "wells.parquet", "wells.csv", "wells.consensus.h5ad"):
        assert str(out.with_name(name)) in printed
    adata = read_h5ad(out)
    assert adata.shape == (16, 8)
    steps = [s["step"] for s in history(adata)]
    assert steps == ["aggregate", "nonfinite", "annotate", "normalize", "feature_select"]
    # MAD-robustised against each plate's controls: control medians are 0
    table = pd.read_parquet(out.with_name("wells.parquet"))
    ctrl = table[table["Metadata_pert_type"] == "control"]
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
