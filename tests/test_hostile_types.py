"""Hostile inputs, issue 22 section 3: values keep their type and meaning.

User tables are read by one reader (`celldino.io.tables.read_table`, and DuckDB with the same
rules in `pp.aggregate`): `Metadata_*` as text as written, features as numbers or refused naming
the cell, a column named twice refused. Config name lists refuse YAML 1.1 booleans and numbers.
Columns celldino writes itself are refused in a user's table. Mixed pixel types in one plate's
illumination function are refused; two channels naming one file through a link are refused.
Each case: exit code 2 (or the UserError type), the message names the cause, nothing written.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from celldino.config import ConfigError, load_config
from celldino.errors import DataError
from celldino.io.tables import read_load_data, read_table

PLATES = ["000123", "123", "1E3", "1000"]  # four plates, as four strings (not 123 twice, 1000.0)
NULLISH = ["None", "NA", "null", "N/A"]  # values of an MoA column, not missing


def _raw_column(path: Path, column: str) -> list[str]:
    """A column as the file spells it (the csv module guesses nothing)."""
    with open(path, newline="") as f:
        return [row[column] for row in csv.DictReader(f)]


def _disk(yx, shape=(64, 64), value=3000.0, dtype=np.uint16, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.poisson(100, shape).astype(np.float64)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for y, x in yx:
        img[(yy - y) ** 2 + (xx - x) ** 2 < 49] += value
    return img.astype(dtype)


LAYOUTS = [
    [(20, 20), (40, 44), (22, 46)],
    [(14, 30), (44, 18), (46, 48)],
    [(30, 14), (18, 44), (48, 36)],
    [(16, 16), (32, 32), (48, 48)],
]


def _screen(
    tmp_path: Path, plates=("P",) * 4, moas=("a",) * 4, extra=None, ld="ld.csv", wells=None
):
    """Four hand-made 2-channel sites (3 nuclei each); the load-data CSV written as text so the
    file holds exactly the strings given."""
    folder = tmp_path / "img"
    folder.mkdir(exist_ok=True)
    rows = []
    for k, yx in enumerate(LAYOUTS):
        row = {
            "Metadata_Plate": plates[k],
            "Metadata_Well": wells[k] if wells else f"A0{k + 1}",
            "Metadata_Site": "1",
            "Metadata_MoA": moas[k],
        }
        for c, v in (("DNA", 3000.0), ("ER", 1500.0)):
            name = f"s{k}_{c}.tif"
            tifffile.imwrite(folder / name, _disk(yx, value=v, seed=k + (10 if c == "ER" else 0)))
            row[f"FileName_{c}"], row[f"PathName_{c}"] = name, str(folder)
        row.update(extra(k) if extra else {})
        rows.append(row)
    path = tmp_path / ld
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


FAST = ("prepare.features=false", "prepare.crop_size=32", "prepare.qc_exclude=false")


def _prep(run_cli, ld: Path, out: Path, *extra: str) -> tuple[int, str]:
    return run_cli("prepare", f"prepare.load_data={ld}", f"prepare.out_dir={out}", *FAST, *extra)


# ---- CSV type guessing ----------------------------------------------------------------------


def test_load_data_metadata_is_text_as_written(tmp_path):
    path = _screen(tmp_path, plates=PLATES, moas=NULLISH)
    df, _ = read_load_data(path)
    assert df["Metadata_Plate"].tolist() == _raw_column(path, "Metadata_Plate") == PLATES
    assert df["Metadata_MoA"].tolist() == NULLISH and df["Metadata_MoA"].notna().all()
    assert df["Metadata_Site"].tolist() == ["1"] * 4  # text: no 1.0 from a float guess


def test_prepare_keeps_barcodes_and_none_as_values(run_cli, tmp_path):
    """Through `celldino prepare`: four plates stay four (000123 and 123, 1E3 and 1000 were
    merged), and every cell of the MoA 'None' keeps it (was missing)."""
    path = _screen(tmp_path, plates=PLATES, moas=NULLISH)
    out = tmp_path / "prep"
    rc, text = _prep(run_cli, path, out, "prepare.illumination=false")
    assert rc == 0, text
    cells = pd.read_parquet(out / "cells.parquet")
    assert sorted(cells["Metadata_Plate"].unique()) == sorted(PLATES)
    truth = dict(zip(_raw_column(path, "Metadata_Well"), _raw_column(path, "Metadata_MoA")))
    assert cells["Metadata_MoA"].notna().all()
    assert (cells["Metadata_MoA"] == cells["Metadata_Well"].map(truth)).all()
    assert (cells["Metadata_MoA"] == "None").sum() == (cells["Metadata_Well"] == "A01").sum() > 0


def _cells_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_profile_keeps_plates_and_none_moa_apart(run_cli, tmp_path):
    """A per-cell CSV through `celldino profile` (DuckDB): the plate 000123 is not 123, 1E3 is
    not 1000, the MoA 'None' is a value; group means checked against numpy on the raw rows."""
    rng = np.random.default_rng(0)
    rows, truth = [], {}
    for p, moa in zip(PLATES, NULLISH):
        vals = rng.normal(size=(3, 2)).round(6)
        truth[p] = vals.mean(axis=0)
        rows += [[p, "A01", moa, *map(str, v)] for v in vals]
    src = _cells_csv(
        tmp_path / "cells.csv",
        ["Metadata_Plate", "Metadata_Well", "Metadata_MoA", "Cells_a", "Cells_b"],
        rows,
    )
    out = tmp_path / "prof.h5ad"
    rc, text = run_cli(
        "profile",
        f"profile.input=[{src}]",
        f"profile.out={out}",
        "profile.recipe=none",
        "profile.controls=",
        "profile.formats=[h5ad]",
    )
    assert rc == 0, text
    from celldino.io.profiles import read_h5ad

    a = read_h5ad(out)
    assert sorted(a.obs["Metadata_Plate"]) == sorted(PLATES)
    assert dict(zip(a.obs["Metadata_Plate"], a.obs["Metadata_MoA"])) == dict(zip(PLATES, NULLISH))
    for p, x in zip(a.obs["Metadata_Plate"], np.asarray(a.X)):
        np.testing.assert_allclose(x, truth[p], atol=1e-9)


def test_profile_table_for_evaluate_keeps_text(tmp_path):
    """The evaluation's reader of a per-well table (and io.profiles.read_profiles): the same."""
    src = _cells_csv(
        tmp_path / "wells.csv",
        ["Metadata_Plate", "Metadata_MoA", "emb_0", "emb_1"],
        [[p, m, "1.5", "2"] for p, m in zip(PLATES, NULLISH)],
    )
    from celldino.eval.runner import read_profile_table
    from celldino.io.profiles import read_profiles

    df = read_profile_table(src)
    assert df["Metadata_Plate"].tolist() == PLATES and df["Metadata_MoA"].tolist() == NULLISH
    assert df["emb_0"].dtype == np.float64
    a = read_profiles(src)
    assert a.obs["Metadata_MoA"].tolist() == NULLISH and list(a.var_names) == ["emb_0", "emb_1"]


# ---- feature columns: one text cell, a name twice --------------------------------------------


def test_text_cell_in_a_feature_column_is_named(tmp_path, run_cli):
    rows = [["P", "A01", "1.0", "2.0"], ["P", "A01", "n/a", "3.0"], ["P", "A02", "4", "5"]]
    header = ["Metadata_Plate", "Metadata_Well", "Cells_a", "Cells_b"]
    src = _cells_csv(tmp_path / "cells.csv", header, rows)
    out = tmp_path / "prof.h5ad"
    rc, text = run_cli("profile", f"profile.input=[{src}]", f"profile.out={out}")
    assert rc == 2 and "line 3 of" in text and str(src) in text, text
    assert "Cells_a" in text and "'n/a'" in text and not out.exists()
    with pytest.raises(DataError, match=r"line 3 of .*column Cells_a holds 'n/a'"):
        read_table(src, features=True)  # the per-well reader (evaluate): the same words
    # a Parquet table with a text feature column: the same check (data row, 1-based)
    pq = tmp_path / "wells.parquet"
    pd.DataFrame({"Metadata_Plate": ["P"] * 3, "Cells_a": ["1", "2", "oops"]}).to_parquet(pq)
    with pytest.raises(DataError, match=r"data row 3 of .*Cells_a holds 'oops'"):
        read_table(pq, features=True)
    # ... and per-cell Parquet shards given to `celldino profile` (DuckDB): the same
    cells = tmp_path / "cells.parquet"
    pd.DataFrame(
        {"Metadata_Plate": ["P"] * 3, "Metadata_Well": ["A01"] * 3, "Cells_a": ["1", "n/a", "2"]}
    ).assign(Cells_b=[1.0, 2.0, 3.0]).to_parquet(cells)
    rc, text = run_cli("profile", f"profile.input=[{cells}]", f"profile.out={out}")
    assert rc == 2 and f"data row 2 of {cells}" in text and "'n/a'" in text, text
    assert not out.exists()


def test_text_plane_number_in_a_load_data_table_is_named(tmp_path):
    """Frame_<CH> (the plane of a multi-page file) with a text cell: pandas made it NaN (the
    first plane, silently); refused naming line and cell. Other text columns are left alone."""
    ld = tmp_path / "ld.csv"
    ld.write_text(
        "Metadata_Plate,FileName_DNA,PathName_DNA,Frame_DNA,Note\n"
        "P,a.tif,.,0,1\nP,b.tif,.,two,fine\n"
    )
    with pytest.raises(DataError, match=r"line 3 of .*column Frame_DNA holds 'two'"):
        read_table(ld)
    ld.write_text(ld.read_text().replace("two", "1"))
    df = read_table(ld)
    assert df["Frame_DNA"].tolist() == [0, 1] and df["Note"].tolist() == ["1", "fine"]


def test_feature_named_twice_is_refused(tmp_path, run_cli):
    header = ["Metadata_Plate", "Metadata_Well", "Cells_a", "Cells_a"]
    src = _cells_csv(tmp_path / "cells.csv", header, [["P", "A01", "1", "2"]])
    out = tmp_path / "prof.h5ad"
    rc, text = run_cli("profile", f"profile.input=[{src}]", f"profile.out={out}")
    assert rc == 2 and str(src) in text and "Cells_a appears more than once" in text, text
    assert not out.exists()
    with pytest.raises(DataError, match="Cells_a appears more than once"):
        read_table(src, features=True)  # (pandas alone would keep both: Cells_a, Cells_a.1)
    assert list(pd.read_csv(src).columns) == [*header[:3], "Cells_a.1"]


# ---- YAML 1.1 booleans and numbers in name lists ---------------------------------------------


@pytest.mark.parametrize(
    ("text", "where", "what"),
    [
        ("prepare:\n  channels: [DNA, ER, NO]\n", "prepare.channels[2]", "boolean False"),
        ("prepare:\n  channels:\n    - DNA\n    - on\n", "prepare.channels[1]", "boolean True"),
        ("prepare:\n  plate: 000123\n", "prepare.plate", "number 83"),
        ("profile:\n  by: [Metadata_Plate, 1.10]\n", "profile.by[1]", "number 1.1"),
        ("prepare:\n  channel_map: {'5': yes}\n", "prepare.channel_map['5']", "boolean True"),
    ],
)
def test_yaml_booleans_and_numbers_in_names_are_refused(tmp_path, run_cli, text, where, what):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    msg = str(e.value)
    assert where in msg and what in msg and "quote it" in msg and str(cfg) in msg, msg
    rc, out = run_cli("prepare", str(cfg))
    assert rc == 2 and where in out


def test_quoted_names_and_numbered_channel_keys_are_kept(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "prepare:\n  channels: [DNA, 'NO']\n  plate: '000123'\n  channel_map: {5: DNA}\n"
    )
    c = load_config(cfg).prepare
    assert c.channels == ("DNA", "NO") and c.plate == "000123" and c.channel_map == {"5": "DNA"}
    # on the command line a list's items are text as typed
    assert load_config(None, ["prepare.channels=DNA,NO"]).prepare.channels == ("DNA", "NO")


# ---- columns celldino writes itself ----------------------------------------------------------


@pytest.mark.parametrize("column", ["Metadata_CellID", "Metadata_ImageKey", "Metadata_QC_Pass"])
def test_user_column_named_like_celldinos_own_is_refused(run_cli, tmp_path, column):
    path = _screen(tmp_path, extra=lambda k: {column: f"mine{k}"})
    out = tmp_path / "prep"
    rc, text = _prep(run_cli, path, out)
    assert rc == 2 and str(path) in text and f"column {column}" in text and "Rename" in text, text
    assert not (out / "qc.parquet").exists() and not (out / "cells.parquet").exists()


def test_metadata_object_number_is_refused_too(run_cli, tmp_path):
    path = _screen(tmp_path, extra=lambda k: {"Metadata_ObjectNumber": str(k)})
    rc, text = _prep(run_cli, path, tmp_path / "prep")
    assert rc == 2 and "Metadata_ObjectNumber" in text, text


# ---- mixed pixel types within a plate --------------------------------------------------------


def _plate(tmp_path: Path, n: int = 14) -> Path:
    """One uint16 plate of n 64x64 sites, 2 channels, under a planted vignetting (1 at the
    centre to 0.5 at the corners), random background levels: enough for illumination to fit."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "img"
    folder.mkdir()
    yy, xx = np.mgrid[:64, :64]
    vignetting = 1 - 0.5 * ((yy - 32) ** 2 + (xx - 32) ** 2) / (2 * 32**2)
    rows = []
    for k in range(n):
        row = {"Metadata_Plate": "P", "Metadata_Well": f"A{k + 1:02d}", "Metadata_Site": "1"}
        for c, v in (("DNA", 3000.0), ("ER", 1500.0)):
            img = rng.poisson(rng.uniform(200, 800), (64, 64)).astype(float)
            for _ in range(2):
                y, x = rng.integers(10, 54, 2)
                img[(yy - y) ** 2 + (xx - x) ** 2 < 49] += v
            name = f"s{k}_{c}.tif"
            tifffile.imwrite(folder / name, (img * vignetting).astype(np.uint16))
            row[f"FileName_{c}"], row[f"PathName_{c}"] = name, str(folder)
        rows.append(row)
    path = tmp_path / "ld.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _retype(path: Path, name: str, dtype) -> None:
    img = tifffile.imread(path.parent / "img" / name)
    if dtype == np.uint8:
        img = (img / 257).astype(np.uint8)  # the 16-bit range mapped onto 8 bits
    else:
        img = img.astype(dtype)
    tifffile.imwrite(path.parent / "img" / name, img)


@pytest.mark.parametrize("dtype", [np.uint8, np.float16])
def test_one_site_of_another_bit_depth_is_refused_before_the_plate_function(
    run_cli, tmp_path, dtype
):
    """One ER image of 14 saved as uint8 / float16 in a uint16 plate: the plate's illumination
    function would average raw values of both ranges (it turned flat into applied and changed
    the segmentation of the 13 others); refused naming the odd file and one of the others,
    nothing written."""
    path = _plate(tmp_path)
    _retype(path, "s2_ER.tif", dtype)
    out = tmp_path / "prep"
    rc, text = _prep(run_cli, path, out)
    # float16 is read as float32 (exactly): the message says both
    name = "float32 (stored as float16)" if dtype == np.float16 else "uint8"
    assert rc == 2 and "different pixel types" in text and "s2_ER.tif" in text, text
    assert f"is {name} (1 image(s))" in text and "s0_ER.tif is uint16 (13)" in text
    assert "channel ER" in text and not (out / "qc.parquet").exists()
    assert not (out / "illum").exists()


def test_uint8_channel_in_a_uint16_site_is_no_longer_silent(run_cli, tmp_path):
    """Without a plate function it runs, and the warning names the uint8 file (a uint8 plane
    stacked with uint16 ones took the site's type and went unmentioned)."""
    path = _plate(tmp_path)
    _retype(path, "s2_ER.tif", np.uint8)
    rc, text = _prep(run_cli, path, tmp_path / "prep", "prepare.illumination=false")
    assert rc == 0, text
    assert "different pixel types" in text and "uint8 (e.g." in text and "s2_ER.tif" in text


def test_uint8_channel_with_plate_percentiles_is_refused(run_cli, tmp_path):
    """The other plate statistic: one set of percentiles per plate over uint8 and uint16 images
    (the uint8 plane, stacked as uint16, was not seen as another type)."""
    path = _plate(tmp_path, n=4)
    _retype(path, "s2_ER.tif", np.uint8)
    out = tmp_path / "prep"
    args = ("prepare.illumination=false", "prepare.normalization=percentile_plate")
    rc, text = _prep(run_cli, path, out, *args)
    assert rc == 2 and "different pixel types within plate P" in text and "s2_ER.tif" in text
    assert not (out / "cells.parquet").exists()


def test_same_types_in_a_plate_still_get_their_function(run_cli, tmp_path):
    path = _plate(tmp_path)
    out = tmp_path / "prep"
    rc, text = _prep(run_cli, path, out)
    assert rc == 0, text
    assert (out / "illum").is_dir() and "different pixel types" not in text


# ---- one file reached two ways ---------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks")
def test_symlink_from_one_channel_to_another_is_refused(run_cli, tmp_path):
    path = _screen(tmp_path)
    img = tmp_path / "img"
    (img / "s1_ER.tif").unlink()
    os.symlink(img / "s1_DNA.tif", img / "s1_ER.tif")  # the ER name points at the DNA file
    out = tmp_path / "prep"
    rc, text = _prep(run_cli, path, out)
    assert rc == 2 and f"line 3 of {path}" in text and "channels DNA and ER" in text, text
    assert "s1_DNA.tif" in text and "s1_ER.tif" in text and "one file" in text
    assert not (out / "qc.parquet").exists()
    # a hard link is the same file too
    (img / "s1_ER.tif").unlink()
    os.link(img / "s1_DNA.tif", img / "s1_ER.tif")
    rc, text = _prep(run_cli, path, out)
    assert rc == 2 and "channels DNA and ER" in text, text


# ---- a role's default column absent (section 6) -----------------------------------------------


def test_missing_dose_column_is_said(caplog):
    """No Metadata_Dose and no evaluate.columns.dose: replicate groups are by compound alone,
    said in a warning (it was silent); a present dose column says nothing."""
    from celldino.eval.runner import FeatureSet, check_columns

    meta = pd.DataFrame({"Metadata_Compound": ["a", "a", "b"], "Metadata_Plate": ["1"] * 3})
    fs = {"cp": FeatureSet("cp", meta, np.zeros((3, 2)), ["f0", "f1"], "wells.csv", "k")}
    with caplog.at_level(logging.WARNING, logger="celldino"):
        check_columns(fs, {}, {})
    said = [r.getMessage() for r in caplog.records if "Metadata_Dose" in r.getMessage()]
    assert len(said) == 1 and "by Metadata_Compound alone" in said[0] and "wells.csv" in said[0]
    caplog.clear()
    dosed = meta.assign(Metadata_Dose="1")
    with_dose = {"cp": FeatureSet("cp", dosed, np.zeros((3, 2)), ["f0", "f1"], "wells.csv", "k")}
    with caplog.at_level(logging.WARNING, logger="celldino"):
        check_columns(with_dose, {}, {})
    assert not [r for r in caplog.records if "Metadata_Dose" in r.getMessage()]


def test_a_selection_comparing_text_metadata_with_a_number_reads_numbers(tmp_path):
    """Metadata are text as written, so `Metadata_Dose == 0` (profile.controls) compares the
    doses '0', '0.0', '1E-3' as numbers (it would match none silently); a dose that is not a
    number is refused naming it."""
    from celldino.query import QueryError
    from celldino.query import evaluate as select

    src = _cells_csv(
        tmp_path / "w.csv",
        ["Metadata_Dose", "Metadata_Compound", "emb_0"],
        [["0", "DMSO", "1"], ["0.0", "DMSO", "1"], ["1E-3", "a", "1"], ["10", "b", "1"]],
    )
    df = read_table(src, features=True)
    assert df["Metadata_Dose"].tolist() == ["0", "0.0", "1E-3", "10"]
    doses = np.array([0.0, 0.0, 1e-3, 10.0])  # the truth, by hand
    assert select(df, "Metadata_Dose == 0").tolist() == (doses == 0).tolist()
    assert select(df, "0 < Metadata_Dose <= 1").tolist() == ((doses > 0) & (doses <= 1)).tolist()
    assert select(df, "Metadata_Dose in [0, 10]").tolist() == [True, True, False, True]
    assert select(df, "Metadata_Dose == '0.0'").tolist() == [False, True, False, False]
    with pytest.raises(QueryError, match="Metadata_Compound.*'DMSO'"):
        select(df, "Metadata_Compound == 0")


# ---- names that meet after `/` → `_`, doses spelt two ways, counts, channels last ------------


def test_sites_whose_names_meet_after_underscores_keep_their_own_masks(run_cli, tmp_path):
    """Plate `P_1` well `A01` and plate `P` well `1_A01` both read `P_1_A01_1` with `/` → `_`:
    the second site's saved masks replaced the first's. Each key now has its own files, and each
    holds its own site's nuclei (the hand-placed centres of its layout)."""
    from celldino.io.masks import mask_paths, read_masks, site_stem

    path = _screen(tmp_path, plates=("P_1", "P", "Q", "Q"), wells=("A01", "1_A01", "A03", "A04"))
    out = tmp_path / "prep"
    rc, text = _prep(run_cli, path, out, "prepare.illumination=false", "prepare.save_masks=true")
    assert rc == 0, text
    keys = ["P_1/A01/1", "P/1_A01/1"]
    assert mask_paths(out, keys[0]) != mask_paths(out, keys[1])
    assert site_stem("Q/A03/1") == "Q_A03_1"  # a plain key keeps the readable name of 0.3
    for k, key in enumerate(keys):
        nuclei, _ = read_masks(out, key)
        assert all(nuclei[y, x] > 0 for y, x in LAYOUTS[k]), key
        other = LAYOUTS[1 - k]
        assert sum(nuclei[y, x] > 0 for y, x in other) < len(other), key
    assert len(list((out / "masks").glob("*_nuclei.tiff"))) == 4


def test_one_dose_spelt_two_ways_is_one_treatment(caplog):
    """Doses are text as written: `1` and `1.0` were two treatments (replicate groups of one
    well each). The evaluation makes them one, warning with the spellings; `10 uM` is left as
    written."""
    from celldino.eval.runner import FeatureSet, check_columns

    meta = pd.DataFrame(
        {"Metadata_Compound": ["a", "a", "a", "b"], "Metadata_Dose": ["1", "1.0", "3", "1e0"]}
    )
    fs = {"cp": FeatureSet("cp", meta, np.zeros((4, 2)), ["f0", "f1"], "wells.csv", "k")}
    with caplog.at_level(logging.WARNING, logger="celldino"):
        check_columns(fs, {}, {})
    assert fs["cp"].meta["Metadata_Dose"].tolist() == ["1", "1", "3", "1"]
    said = [r.getMessage() for r in caplog.records if "spells one dose" in r.getMessage()]
    assert len(said) == 1 and "1 = 1.0 = 1e0" in said[0], said
    worded = meta.assign(Metadata_Dose=["1", "1.0", "10 uM", "1"])
    fs = {"cp": FeatureSet("cp", worded.copy(), np.zeros((4, 2)), ["f0", "f1"], "w.csv", "k")}
    check_columns(fs, {}, {})
    assert fs["cp"].meta["Metadata_Dose"].tolist() == worded["Metadata_Dose"].tolist()


def test_consensus_groups_doses_by_number_and_keeps_the_users_count(caplog):
    """pp.consensus: `1` and `1.0` one group (its median equals pandas' over float doses), and
    a Metadata_Count_Replicates already in the input is kept as ..._input, not overwritten."""
    import anndata as ad

    from celldino.pp import consensus

    rng = np.random.default_rng(0)
    X = rng.normal(size=(6, 3))
    obs = pd.DataFrame(
        {
            "Metadata_Compound": ["a", "a", "a", "b", "b", "b"],
            "Metadata_Dose": ["1", "1.0", "1", "3", "3.0", "0.3"],
            "Metadata_Count_Replicates": ["4", "4", "4", "2", "2", "2"],
        },
        index=[str(i) for i in range(6)],
    )
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=["f0", "f1", "f2"]))
    with caplog.at_level(logging.WARNING, logger="celldino"):
        out = consensus(adata, by=["Metadata_Compound", "Metadata_Dose"])
    truth = (
        pd.DataFrame(X, columns=["f0", "f1", "f2"])
        .assign(c=obs["Metadata_Compound"].to_numpy(), d=obs["Metadata_Dose"].astype(float).values)
        .groupby(["c", "d"])
        .median()
    )
    assert out.n_obs == len(truth) == 3
    got = out.obs.assign(d=out.obs["Metadata_Dose"].astype(float))
    for i, (c, d) in enumerate(zip(got["Metadata_Compound"], got["d"])):
        np.testing.assert_allclose(out.X[i], truth.loc[(c, d)].to_numpy())
    counts = dict(zip(out.obs["Metadata_Dose"], out.obs["Metadata_Count_Replicates"]))
    assert counts == {"1": 3, "3": 2, "0.3": 1}
    kept = dict(zip(out.obs["Metadata_Dose"], out.obs["Metadata_Count_Replicates_input"]))
    assert kept == {"1": "4", "3": "2", "0.3": "2"}
    assert any("Metadata_Count_Replicates_input" in r.getMessage() for r in caplog.records)


def test_a_channels_last_npy_is_refused_not_read_as_rows(run_cli, tmp_path):
    """An (H, W, C) .npy was a stack of H planes: `Frame_DNA=0` read the first row of pixels
    (64 x 2) as the image. It is refused naming the shape and the fix; (C, H, W) and
    (H, W, 1) still read."""
    from celldino.io.images import ImageReadError, read_image

    img = np.stack([_disk(LAYOUTS[0]), _disk(LAYOUTS[0], value=1500.0, seed=3)], axis=-1)
    np.save(tmp_path / "hwc.npy", img)
    with pytest.raises(ImageReadError, match=r"shape \(64, 64, 2\).*np.moveaxis"):
        read_image(tmp_path / "hwc.npy", frame=0)
    np.save(tmp_path / "chw.npy", np.moveaxis(img, -1, 0))
    np.testing.assert_array_equal(read_image(tmp_path / "chw.npy", frame=1), img[..., 1])
    np.save(tmp_path / "hw1.npy", img[..., :1])
    np.testing.assert_array_equal(read_image(tmp_path / "hw1.npy"), img[..., 0])
    ld = tmp_path / "ld.csv"
    ld.write_text(
        "Metadata_Plate,Metadata_Well,Metadata_Site,FileName_DNA,PathName_DNA,Frame_DNA,"
        f"FileName_ER,PathName_ER,Frame_ER\nP,A01,1,hwc.npy,{tmp_path},0,hwc.npy,{tmp_path},1\n"
    )
    rc, text = _prep(run_cli, ld, tmp_path / "prep")
    assert rc == 2 and "hwc.npy" in text and "channels as the last axis" in text, text
    assert "Traceback" not in text
