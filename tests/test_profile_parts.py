"""`celldino profile` beyond one machine: per-plate aggregation parts, then one merge run.

Each plate's cells are aggregated on their own (`profile.recipe=none profile.controls=`: wells
only, no normalisation), anywhere; the merge run reads the part files (profiles as input: one
row per plate x well, their `Metadata_Count_Cells` kept) and normalises over the whole screen.
The result equals one `profile` run over every plate's cells. A well whose cells were split over
two parts is refused (it would average averages), naming the well.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from celldino.cli import main

WELLS, CELLS = 20, 12  # wells per plate, cells per well


def _plate(folder: Path, p: int, rng: np.random.Generator) -> pd.DataFrame:
    n = WELLS * CELLS
    df = pd.DataFrame(
        {
            "Metadata_Plate": f"P{p}",
            "Metadata_Well": np.repeat([f"W{w:02d}" for w in range(WELLS)], CELLS),
            "Metadata_pert_type": np.repeat(["control"] * 4 + ["trt"] * (WELLS - 4), CELLS),
            "Metadata_Compound": np.repeat([f"c{w % 8}" for w in range(WELLS)], CELLS),
        }
    )
    x = rng.normal(size=(n, 6)).astype(np.float32) + p  # a plate effect to normalise away
    for i in range(6):
        df[f"emb_{i:04d}"] = x[:, i]
    folder.mkdir(parents=True)
    half = n // 2
    df.iloc[:half].to_parquet(folder / "part-00000.parquet", index=False)
    df.iloc[half:].to_parquet(folder / "part-00001.parquet", index=False)
    return df


def _profile(*args: str) -> int:
    return main(["profile", *args, "profile.formats=[parquet]"])


def test_per_plate_parts_then_merge_equal_one_run(tmp_path):
    rng = np.random.default_rng(0)
    plates = [tmp_path / "emb" / f"plate{p}" for p in range(3)]
    cells = pd.concat([_plate(f, p, rng) for p, f in enumerate(plates)], ignore_index=True)
    for f in plates:  # one job per plate
        part = tmp_path / "parts" / f"{f.name}.h5ad"
        assert _profile(f"profile.input=[{f}]", f"profile.out={part}", "profile.recipe=none") == 0
    parts = sorted(str(p) for p in (tmp_path / "parts").glob("*.parquet"))
    assert len(parts) == 3
    assert _profile(f"profile.input=[{','.join(parts)}]", f"profile.out={tmp_path}/m/p.h5ad") == 0
    folders = ",".join(map(str, plates))
    assert _profile(f"profile.input=[{folders}]", f"profile.out={tmp_path}/one/p.h5ad") == 0

    merged = pd.read_parquet(tmp_path / "m" / "p.parquet")
    one = pd.read_parquet(tmp_path / "one" / "p.parquet")
    assert sorted(merged.columns) == sorted(one.columns)
    pd.testing.assert_frame_equal(merged[one.columns], one, check_exact=True)
    # the parts' aggregation itself, against pandas on the cells
    feats = [c for c in cells.columns if c.startswith("emb_")]
    raw = cells.groupby(["Metadata_Plate", "Metadata_Well"])[feats].mean()
    got = pd.concat(pd.read_parquet(p) for p in parts).set_index(
        ["Metadata_Plate", "Metadata_Well"]
    )
    np.testing.assert_allclose(got.loc[raw.index, feats], raw, rtol=1e-6, atol=1e-6)
    assert (got["Metadata_Count_Cells"] == CELLS).all()


def test_a_well_split_over_two_parts_is_refused(tmp_path, capfd):
    rng = np.random.default_rng(1)
    cells = _plate(tmp_path / "emb", 0, rng)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    cut = 5 * CELLS + 3  # inside well W05
    cells.iloc[:cut].to_parquet(a / "part-00000.parquet", index=False)
    cells.iloc[cut:].to_parquet(b / "part-00000.parquet", index=False)
    for f in (a, b):  # part b has no control well: controls off for the parts
        args = [f"profile.input=[{f}]", f"profile.out={tmp_path}/parts/{f.name}.h5ad"]
        assert _profile(*args, "profile.recipe=none", "profile.controls=") == 0
    parts = ",".join(str(tmp_path / "parts" / f"{n}.parquet") for n in "ab")
    assert _profile(f"profile.input=[{parts}]", f"profile.out={tmp_path}/m/p.h5ad") == 2
    err = capfd.readouterr().err
    assert "'Metadata_Well': 'W05'" in err and "average averages" in err
