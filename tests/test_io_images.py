"""Image readers and load-data tables: every format against the array written, bad input named."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr
from PIL import Image

from celldino.io.images import ImageReadError, image_shape, read_image
from celldino.io.tables import LoadDataError, load_data_from_folder, read_load_data

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.int32])
def test_tiff_dtypes_roundtrip(tmp_path, dtype):
    a = (RNG.random((17, 23)) * 200).astype(dtype)
    tifffile.imwrite(tmp_path / "a.tif", a, compression="zlib")
    b = read_image(tmp_path / "a.tif")
    assert b.dtype == a.dtype and np.array_equal(a, b)
    assert image_shape(tmp_path / "a.tif") == (17, 23)


def test_multipage_and_ome_tiff(tmp_path):
    stack = RNG.integers(0, 4000, (3, 12, 10), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "m.tif", stack, photometric="minisblack")
    assert len(tifffile.TiffFile(tmp_path / "m.tif").pages) == 3
    assert np.array_equal(read_image(tmp_path / "m.tif", frame=2), stack[2])
    with pytest.raises(ImageReadError, match="3 planes"):
        read_image(tmp_path / "m.tif")
    with pytest.raises(ImageReadError, match="out of range"):
        read_image(tmp_path / "m.tif", frame=3)
    tifffile.imwrite(tmp_path / "o.ome.tif", stack, ome=True, metadata={"axes": "CYX"})
    assert tifffile.TiffFile(tmp_path / "o.ome.tif").is_ome
    assert np.array_equal(read_image(tmp_path / "o.ome.tif", frame=1), stack[1])


def test_png_npy_npz_zarr(tmp_path):
    a8 = RNG.integers(0, 255, (9, 11), dtype=np.uint8)
    a16 = RNG.integers(0, 65535, (9, 11), dtype=np.uint16)
    Image.fromarray(a8).save(tmp_path / "a8.png")
    Image.fromarray(a16).save(tmp_path / "a16.png")
    assert np.array_equal(read_image(tmp_path / "a8.png"), a8)
    b16 = read_image(tmp_path / "a16.png")
    assert b16.dtype == np.uint16 and np.array_equal(b16, a16)
    np.save(tmp_path / "a.npy", a16)
    assert np.array_equal(read_image(tmp_path / "a.npy"), a16)
    np.savez(tmp_path / "a.npz", dna=a16, er=a8)
    assert np.array_equal(read_image(tmp_path / "a.npz", key="er"), a8)
    with pytest.raises(ImageReadError, match="say which key"):
        read_image(tmp_path / "a.npz")
    z = zarr.create_array(
        str(tmp_path / "a.zarr"), shape=(2, 9, 11), chunks=(1, 9, 11), dtype="uint16"
    )
    z[:] = np.stack([a16, a16 // 2])
    assert np.array_equal(read_image(tmp_path / "a.zarr", frame=1), a16 // 2)


def test_truncated_and_missing_files_are_named(tmp_path):
    a = RNG.integers(0, 4000, (64, 64), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "t.tif", a)
    data = (tmp_path / "t.tif").read_bytes()
    (tmp_path / "t.tif").write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageReadError) as e:
        read_image(tmp_path / "t.tif")
    assert "t.tif" in str(e.value)
    with pytest.raises(ImageReadError, match="file not found"):
        read_image(tmp_path / "nope.tif")
    (tmp_path / "x.bmpx").write_bytes(b"123")
    with pytest.raises(ImageReadError, match="unknown image format"):
        read_image(tmp_path / "x.bmpx")


def test_missing_channel_lists_available(tmp_path):
    df = pd.DataFrame(
        {
            "FileName_DNA": ["a.tif"],
            "PathName_DNA": ["."],
            "FileName_ER": ["b.tif"],
            "PathName_ER": ["."],
        }
    )
    df.to_csv(tmp_path / "ld.csv", index=False)
    with pytest.raises(LoadDataError) as e:
        read_load_data(tmp_path / "ld.csv", ["DNA", "Mito"])
    assert "FileName_Mito" in str(e.value) and "DNA, ER" in str(e.value)
    df.to_parquet(tmp_path / "ld.parquet")
    table, chans = read_load_data(tmp_path / "ld.parquet", ["ER", "DNA"])
    assert chans == ["ER", "DNA"]
    assert table.loc[0, "PathName_DNA"] == str(tmp_path.resolve())  # relative → table folder


def test_opera_phenix_pattern_on_real_site(cellpainting_fovs):
    folder = cellpainting_fovs / "pediatric_cancer_atlas_profiling" / "images" / "orig"
    cmap = {"5": "DNA", "2": "ER", "6": "RNA", "3": "AGP", "4": "Mito", "1": "Brightfield"}
    df, chans = load_data_from_folder(folder, "opera_phenix", cmap, plate="BR00143976")
    assert chans == ["DNA", "ER", "RNA", "AGP", "Mito", "Brightfield"]  # channel-map order
    assert len(df) == 1
    row = df.iloc[0]
    assert (row.Metadata_Well, row.Metadata_Site, row.Metadata_Plate) == ("C03", 3, "BR00143976")
    assert row.FileName_DNA == "r03c03f03p01-ch5sk1fk1fl1.tiff"


def test_nf1_pattern_on_real_sites(cellpainting_fovs):
    folder = cellpainting_fovs / "NF1_cellpainting_data_shrunken" / "Plate_2_images"
    df, chans = load_data_from_folder(folder, "nf1", {"DAPI": "DNA", "GFP": "GFP", "RFP": "RFP"})
    assert chans == ["DNA", "GFP", "RFP"]
    assert sorted(df.Metadata_Well) == ["B7", "D6", "D7", "F7", "H12"]
    b7 = df[df.Metadata_Well == "B7"].iloc[0]
    assert b7.Metadata_Site == 3 and b7.FileName_DNA == "B7_01_1_3_DAPI_001.tif"
    with pytest.raises(LoadDataError, match="available channels: DNA, GFP, RFP"):
        load_data_from_folder(folder, "nf1", {"DAPI": "DNA", "GFP": "GFP", "RFP": "RFP"}, ["Mito"])


def test_custom_regex_with_plate_group(tmp_path):
    for plate in ("P1", "P2"):
        for ch in ("w1", "w2"):
            tifffile.imwrite(tmp_path / f"{plate}_A01_s1_{ch}.tif", np.zeros((4, 4), np.uint16))
    pat = r"(?P<plate>P\d)_(?P<well>[A-P]\d\d)_s(?P<site>\d)_(?P<channel>w\d)\.tif"
    df, chans = load_data_from_folder(tmp_path, pat, {"w1": "DNA", "w2": "ER"})
    assert list(df.Metadata_Plate) == ["P1", "P2"] and chans == ["DNA", "ER"]
    (tmp_path / "P1_A01_s2_w1.tif").write_bytes((tmp_path / "P1_A01_s1_w1.tif").read_bytes())
    with pytest.raises(LoadDataError, match="lacks a file"):
        load_data_from_folder(tmp_path, pat, {"w1": "DNA", "w2": "ER"})


def test_tables_in_the_encodings_and_separators_excel_writes(tmp_path):
    df = pd.DataFrame(
        {"FileName_DNA": ["a.tif"], "PathName_DNA": ["."], "Metadata_Compound": ["Café ß"]}
    )
    for name, sep, enc in (
        ("u16.csv", "\t", "utf-16"),
        ("semi.csv", ";", "cp1252"),
        ("bom.csv", ",", "utf-8-sig"),
    ):
        (tmp_path / name).write_bytes(df.to_csv(index=False, sep=sep).encode(enc))
        table, chans = read_load_data(tmp_path / name)
        assert chans == ["DNA"] and table.at[0, "Metadata_Compound"] == "Café ß", name
    (tmp_path / "sp.csv").write_text(" FileName_DNA , PathName_DNA\na.tif,.\n")
    assert read_load_data(tmp_path / "sp.csv")[1] == ["DNA"]  # spaces around names stripped
    with pytest.raises(LoadDataError, match="more than once"):
        read_load_data(tmp_path / "bom.csv", ["DNA", "DNA"])
