"""Review of issue 22's provenance module and last silent results (reviewer R1): each test is a
case the first version of that work got wrong."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from celldino.eval import runner

# ---- evaluate: a part computed before doses were merged is not "done" ------------------------


def _dose_profiles(path):
    """Two compounds, each at one dose spelt `1` in two wells and `1.0` in two others."""
    rng = np.random.default_rng(0)
    meta = pd.DataFrame(
        {
            "Metadata_Compound": ["a"] * 4 + ["b"] * 4,
            "Metadata_Dose": ["1", "1", "1.0", "1.0"] * 2,
            "Metadata_Plate": ["P"] * 8,
        }
    )
    feats = pd.DataFrame(rng.normal(size=(8, 3)), columns=["f0", "f1", "f2"])
    pd.concat([meta, feats], axis=1).to_csv(path, index=False)


def test_an_evaluation_made_before_doses_were_merged_is_computed_again(tmp_path, monkeypatch):
    """An evaluation an older celldino made (doses `1` and `1.0` two treatments) had the same
    part key as one made now: resuming kept its numbers ('done before, kept'). A feature set
    whose doses were merged gets another key, so the part is computed again."""
    _dose_profiles(tmp_path / "p.csv")

    def n_doses(meta, X, ctx, **params):  # the treatments an analysis sees
        return {"n": meta["Metadata_Dose"].nunique()}

    monkeypatch.setitem(runner.ANALYSES, "n_doses", n_doses)
    cfg = runner.EvaluateConfig(out_dir=str(tmp_path / "out"))
    spec = {"analyses": ["n_doses"]}
    with monkeypatch.context() as old:  # the celldino before the merge
        old.setattr(runner, "one_dose_per_number", lambda *a, **k: None)
        runner.evaluate(tmp_path / "p.csv", spec=spec, cfg=cfg)
    assert pd.read_parquet(tmp_path / "out" / "metrics.parquet")["value"].tolist() == [2]
    runner.evaluate(tmp_path / "p.csv", spec=spec, cfg=cfg)  # upgraded, resuming
    assert pd.read_parquet(tmp_path / "out" / "metrics.parquet")["value"].tolist() == [1]


def test_a_derived_set_of_merged_doses_is_computed_again_too(tmp_path, monkeypatch):
    """A derived (PCA) set shares its base set's metadata: its key changes with the merge."""
    _dose_profiles(tmp_path / "p.csv")

    def n_doses(meta, X, ctx, **params):
        return {"n": meta["Metadata_Dose"].nunique()}

    monkeypatch.setitem(runner.ANALYSES, "n_doses", n_doses)
    cfg = runner.EvaluateConfig(out_dir=str(tmp_path / "out"))
    spec = {"analyses": ["n_doses"], "derived": {"pca": {"pca": "learned", "n_components": 2}}}
    with monkeypatch.context() as old:
        old.setattr(runner, "one_dose_per_number", lambda *a, **k: None)
        runner.evaluate(tmp_path / "p.csv", spec=spec, cfg=cfg)
    runner.evaluate(tmp_path / "p.csv", spec=spec, cfg=cfg)
    got = pd.read_parquet(tmp_path / "out" / "metrics.parquet")
    assert dict(zip(got["feature_set"], got["value"])) == {"learned": 1, "pca": 1}


def test_an_evaluation_part_of_another_celldino_version_is_computed_again(tmp_path, monkeypatch):
    """`celldino run` redoes evaluate after an upgrade (its statistics live in code), yet the
    parts were keyed by the data and settings alone, so the upgraded run kept every number the
    old code computed. The version is in the key; the same version still resumes."""
    import celldino

    _dose_profiles(tmp_path / "p.csv")
    calls = []

    def counted(meta, X, ctx, **params):
        calls.append(1)
        return {"n": len(meta)}

    monkeypatch.setitem(runner.ANALYSES, "counted", counted)
    cfg = runner.EvaluateConfig(out_dir=str(tmp_path / "out"))
    spec = {"analyses": ["counted"]}
    runner.evaluate(tmp_path / "p.csv", spec=spec, cfg=cfg)
    runner.evaluate(tmp_path / "p.csv", spec=spec, cfg=cfg)
    assert len(calls) == 1  # resumed: kept
    monkeypatch.setattr(celldino, "__version__", celldino.__version__ + ".post1")
    runner.evaluate(tmp_path / "p.csv", spec=spec, cfg=cfg)
    assert len(calls) == 2


# ---- images: the channels-last refusal holds for TIFF as for .npy ------------------------------


def test_a_channels_last_tiff_is_refused_as_the_npy_is(tmp_path):
    """tifffile writes an (H, W, 5) array as H pages of W x 5 pixels: `Frame_DNA=0` read the first
    row of pixels as the image and image_shape said 64x5, where the same array as .npy is
    refused. Refused the same way; (C, H, W) TIFFs and one plane still read."""
    import tifffile

    from celldino.io.images import ImageReadError, image_shape, read_image

    img = np.random.default_rng(0).integers(0, 4000, size=(64, 64, 5)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "hwc.tif", img)
    for read in (lambda p: read_image(p, frame=0), image_shape, read_image):
        with pytest.raises(ImageReadError, match=r"hwc.tif.*5 channels as the last axis"):
            read(tmp_path / "hwc.tif")
    tifffile.imwrite(tmp_path / "chw.tif", np.moveaxis(img, -1, 0))
    np.testing.assert_array_equal(read_image(tmp_path / "chw.tif", frame=3), img[..., 3])
    assert image_shape(tmp_path / "chw.tif") == (64, 64)
    tifffile.imwrite(tmp_path / "one.tif", img[..., 0])
    np.testing.assert_array_equal(read_image(tmp_path / "one.tif"), img[..., 0])


# ---- masks saved by an older celldino stay readable --------------------------------------------


def _old_prep(tmp_path, keys):
    """A prep an older celldino saved masks in: `/` → `_` only (no `~hash` suffix), and its
    images.parquet listing the keys."""
    from celldino.io.masks import MASKS, _tiff_bytes
    from celldino.io.prepared import IMAGES

    prep = tmp_path / "prep"
    (prep / MASKS).mkdir(parents=True)
    pd.DataFrame({"Metadata_ImageKey": keys}).to_parquet(prep / IMAGES)
    labels = {}
    for k, key in enumerate(keys):
        nuclei = np.zeros((8, 8), np.uint16)
        nuclei[k, k] = k + 1
        stem = key.replace("/", "_")
        (prep / MASKS / f"{stem}_nuclei.tiff").write_bytes(_tiff_bytes(nuclei))
        (prep / MASKS / f"{stem}_cells.tiff").write_bytes(_tiff_bytes(nuclei * 2))
        labels[key] = nuclei
    return prep, labels


def test_masks_an_older_celldino_saved_are_still_read(tmp_path):
    """Keys holding `_` (plate `Plate_1`, common) got a `~hash` file name this release: an
    existing prep's masks were 'not found' (a raw FileNotFoundError) by read_masks, the
    documented reader, though the files are there under the name the older celldino gave."""
    from celldino.io.masks import read_masks

    prep, labels = _old_prep(tmp_path, ["Plate_1/A01/1", "Plate_1/A02/1", "P1/A01/1"])
    for key, nuclei in labels.items():
        got_n, got_c = read_masks(prep, key)
        np.testing.assert_array_equal(got_n, nuclei)
        np.testing.assert_array_equal(got_c, nuclei * 2)


def test_an_old_mask_name_two_sites_shared_is_refused_not_read_as_either(tmp_path):
    """Under the old names plate `P_1` well `A01` and plate `P` well `1_A01` shared one file (the
    second site's replaced the first's): reading it for either would be another site's masks."""
    from celldino.errors import UserError
    from celldino.io.masks import read_masks

    prep, _ = _old_prep(tmp_path, ["P_1/A01/1"])
    pd.DataFrame({"Metadata_ImageKey": ["P_1/A01/1", "P/1_A01/1"]}).to_parquet(
        prep / "images.parquet"
    )
    for key in ("P_1/A01/1", "P/1_A01/1"):
        with pytest.raises(UserError, match=r"P_1_A01_1_nuclei.tiff.*P/1_A01/1.*P_1/A01/1"):
            read_masks(prep, key)


def test_masks_of_a_site_without_saved_masks_name_the_file_and_the_setting(tmp_path):
    from celldino.errors import UserError
    from celldino.io.masks import read_masks

    prep, _ = _old_prep(tmp_path, ["P1/A01/1"])
    with pytest.raises(UserError, match=r"P1_A02_1_nuclei.tiff.*prepare.save_masks"):
        read_masks(prep, "P1/A02/1")


def test_a_site_key_too_long_for_a_file_name_gets_a_short_one_per_key(tmp_path):
    """A plate name of 250 characters made a mask file name over the 255-byte limit of Linux
    and macOS file systems: prepare.save_masks ended in a raw OSError (File name too long). Such
    a stem is cut and ends in its key's hash, one per key; every stem that fit keeps its name."""
    from celldino.io.masks import read_masks, site_stem, write_masks

    keys = ["P" * 250 + "/A01/1", "P" * 250 + "/A01/2", "é" * 130 + "/A01/1", "P_" * 125 + "/A1/1"]
    stems = {site_stem(k) for k in keys}
    assert len(stems) == len(keys) and all(len(s.encode()) <= 229 for s in stems)
    for k, key in enumerate(keys):
        write_masks(tmp_path, key, np.full((4, 4), k, np.uint16), np.zeros((4, 4), np.uint16))
    for k, key in enumerate(keys):
        assert (read_masks(tmp_path, key)[0] == k).all()
    assert site_stem("Q/A03/1") == "Q_A03_1"
    fits = "Q" * 200 + "/A01/1"  # 207 bytes: wrote before, keeps its name
    assert site_stem(fits) == fits.replace("/", "_")


# ---- one_spelling_per_number: a column mixing numbers and text -------------------------------


def test_doses_mixing_numbers_and_text_are_one_group_per_number(caplog):
    """pp.consensus on profiles joined from a set with float doses and one with text doses:
    the warning said `1.0 = 1` were one group, yet the float 1.0 and the text '1.0' stayed two
    (pandas groups by value and type). Every filled cell is grouped by its text."""
    import anndata as ad

    from celldino.io.tables import one_spelling_per_number
    from celldino.pp import consensus

    X = np.arange(12, dtype=float).reshape(6, 2)
    dose = pd.Series([1.0, "1", "1.0", 3.0, "3", "3.0"], dtype=object)
    obs = pd.DataFrame(
        {"Metadata_Compound": ["a"] * 3 + ["b"] * 3, "Metadata_Dose": dose.to_numpy()},
        index=[str(i) for i in range(6)],
    )
    out = consensus(ad.AnnData(X=X, obs=obs), by=["Metadata_Compound", "Metadata_Dose"])
    assert out.n_obs == 2 and out.obs["Metadata_Count_Replicates"].tolist() == [3, 3]
    np.testing.assert_allclose(out.X, [np.median(X[:3], axis=0), np.median(X[3:], axis=0)])
    values, _ = one_spelling_per_number(pd.Series([1, "1", None, "2"], dtype=object))
    assert values.tolist() == ["1", "1", None, "2"]


# ---- prepare's input record: an image that is a folder (Zarr) is one input --------------------


def test_a_zarr_image_is_one_input_file_as_before(tmp_path):
    """Prepare's input record moved to io.provenance.record, which expands folders: a Zarr image
    (a folder of chunk files) became its chunks, so every existing prep of Zarr images read as
    'image files changed' after the upgrade and was started afresh, and inputs.parquet listed
    each chunk. Each image of the table is one entry, its (size, time) as `stat` gives them: the
    fingerprint equals the one an older celldino recorded."""
    import hashlib

    import zarr

    from celldino.config import PrepareConfig
    from celldino.data.prepare import input_fingerprint

    rows = []
    for site in (1, 2):
        row = {"Metadata_Plate": "P", "Metadata_Well": "A01", "Metadata_Site": str(site)}
        for ch in ("DNA", "ER"):
            z = zarr.create_array(
                str(tmp_path / f"s{site}_{ch}.zarr"), shape=(32, 32), chunks=(8, 8), dtype="uint16"
            )
            z[:] = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32)
            row |= {f"FileName_{ch}": f"s{site}_{ch}.zarr", f"PathName_{ch}": str(tmp_path)}
        rows.append(row)
    pd.DataFrame(rows).to_csv(tmp_path / "ld.csv", index=False)
    cfg = PrepareConfig(load_data=str(tmp_path / "ld.csv"), out_dir=str(tmp_path / "o"))
    got = input_fingerprint(cfg)
    files = [str(tmp_path / f"s{s}_{c}.zarr") for c in ("DNA", "ER") for s in (1, 2)]
    blob = "\n".join(
        f"{p}\t{(st := __import__('os').stat(p)).st_size}\t{st.st_mtime_ns}" for p in files
    )
    assert got["n_images"] == 4
    assert got["images"] == hashlib.sha256(blob.encode()).hexdigest()[:16]


def test_the_row_of_a_changed_image_is_found_as_by_comparing_every_row():
    """Naming a changed image's load-data row compared every row's whole path (5 s a name on a
    200,000-site table, six names a message); now only rows whose file name ends the same way:
    the same (row, channel) as the comparison of every row, with sub-folders in FileName and
    names that end another's."""
    from pathlib import Path
    from types import SimpleNamespace

    from celldino.data.prepare import _row_of

    table = pd.DataFrame(
        {
            "PathName_DNA": ["/d", "/d", "/d/", "/e"],
            "FileName_DNA": ["xa.tif", "a.tif", "sub/a.tif", "a.tif"],
            "PathName_ER": ["/d"] * 4,
            "FileName_ER": ["er1.tif", "er2.tif", "a.tif", "er4.tif"],
        }
    )
    iset = SimpleNamespace(channels=["DNA", "ER"], table=table)

    def every_row(path):
        for c in ("DNA", "ER"):
            for i in range(len(table)):
                p = f"{table.at[i, f'PathName_{c}']}/{table.at[i, f'FileName_{c}']}"
                if str(Path(p)) == path:
                    return i, c
        return -1, "mask"

    for path in ("/d/a.tif", "/d/xa.tif", "/d/sub/a.tif", "/e/a.tif", "/d/er4.tif", "/x/m.tif"):
        assert _row_of(iset, path) == every_row(path), path


# ---- profile: each CSV header read once per file state -----------------------------------------


def test_profile_reads_each_csv_header_once_and_again_when_the_file_changes(tmp_path, monkeypatch):
    """profile's DuckDB reader is built for every query; since it took the separator from each
    file's header (`csv_separator`) every build read every header again (8 s a build for 1,000
    CSV files; a run builds it several times). The separator is kept per file state, as the
    columns are: read once, and again for a file rewritten with another separator."""
    import importlib

    aggregate = importlib.import_module("celldino.pp.aggregate")
    from celldino.io import tables

    reads = []

    def counted(path, *a, **k):
        reads.append(path)
        return tables.csv_separator(path, *a, **k)

    monkeypatch.setattr(aggregate, "csv_separator", counted)
    df = pd.DataFrame({"Metadata_Plate": ["P", "Q"], "f0": [1.5, 2.5]})
    files = [str(tmp_path / f"c{i}.csv") for i in range(3)]
    for f in files:
        df.to_csv(f, index=False)
    assert "delim=','" in aggregate._reader(files)
    first = len(reads)  # the separator, and the columns (each header once)
    for _ in range(3):
        assert "delim=','" in aggregate._reader(files)
    assert len(reads) == first and set(reads) == set(files)
    df.assign(f1=0.0).to_csv(files[1], index=False, sep=";")  # another size, another time
    with pytest.raises(Exception, match=r"c1.csv by ';'"):
        aggregate._reader(files)


def test_a_site_whose_cell_mask_is_missing_names_that_file(tmp_path):
    from celldino.errors import UserError
    from celldino.io.masks import mask_paths, read_masks, write_masks

    write_masks(tmp_path, "P1/A01/1", np.ones((4, 4), np.uint16), np.ones((4, 4), np.uint16))
    mask_paths(tmp_path, "P1/A01/1")[1].unlink()
    with pytest.raises(UserError, match=r"P1_A01_1_cells.tiff: no saved masks"):
        read_masks(tmp_path, "P1/A01/1")


def test_controls_named_by_a_dose_spelt_two_ways_stay_controls():
    """Controls named by the dose column (`control=Metadata_Dose control_value=0`, as for DMSO at
    dose 0): with `0.0` written first, merging made every `0` a `0.0`, and the three wells that
    were controls before matched the control value no more (activity skipped, the controls
    scored as a treatment). The merged dose keeps the control value's spelling."""
    from celldino.eval.runner import FeatureSet, check_columns
    from celldino.eval.spec import is_control_row

    meta = pd.DataFrame(
        {
            "Metadata_Compound": ["d", "d", "d", "a", "a"],
            "Metadata_Dose": ["0.0", "0", "0", "1", "1.0"],
        }
    )
    fs = {"cp": FeatureSet("cp", meta, np.zeros((5, 2)), ["f0", "f1"], "wells.csv", "k")}
    check_columns(fs, {"control": "Metadata_Dose", "control_value": "0"}, {})
    got = fs["cp"].meta
    assert is_control_row(got, "Metadata_Dose", "0").tolist() == [True, True, True, False, False]
    assert got["Metadata_Dose"].tolist() == ["0", "0", "0", "1", "1"]
