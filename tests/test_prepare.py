"""The prepare pipeline end to end: tiny screen, resumability, real sites, bad input."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr
from scipy import ndimage as ndi

from celldino.config import PrepareConfig
from celldino.data import CropDataset, FieldDataset
from celldino.data.illumination import apply_illumination
from celldino.data.imagesets import ImageSetError
from celldino.data.prepare import prepare
from celldino.io.images import ImageReadError, read_image

FAST = dict(features=False, crop_size=32)


@pytest.fixture(scope="module")
def tiny_prep(tiny_screen, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep")
    return prepare(
        PrepareConfig(
            load_data=str(tiny_screen / "load_data.csv"),
            out_dir=str(out),
            crop_size=48,
            cell_channel="AGP",
        )
    )


def test_tiny_screen_outputs(tiny_prep, tiny_screen):
    cells = pd.read_parquet(tiny_prep / "cells.parquet")
    arr = zarr.open_array(str(tiny_prep / "crops.zarr"), mode="r")
    assert arr.shape == (len(cells), 5, 48, 48) and arr.dtype == np.uint16
    assert arr.attrs["channels"] == ["DNA", "ER", "RNA", "AGP", "Mito"]
    assert arr.attrs["normalization"]["method"] == "percentile_image"
    assert cells["Metadata_CellID"].is_unique and len(cells) > 50
    # QC-flagged (planted) images are left out by default
    assert set(cells["Metadata_QC_Truth"]) == {"ok"}
    eng = pd.read_parquet(tiny_prep / "engineered.parquet")
    assert list(eng["Metadata_CellID"]) == list(cells["Metadata_CellID"])
    # CellProfiler's measurements under CellProfiler's names, all families by default
    fams = {c.split("_")[1] for c in eng.columns if not c.startswith("Metadata_")}
    assert fams == {
        "AreaShape",
        "Intensity",
        "RadialDistribution",
        "Texture",
        "Granularity",
        "Correlation",
    }
    assert "Cytoplasm_Texture_AngularSecondMoment_Mito_3_00_256" in eng.columns
    # Area is the pixel count of the cell in the label image prepare recorded
    assert (eng["Cells_AreaShape_Area"] == cells["Metadata_Cells_Area"]).all()
    # crop i is the illumination-corrected image around the recorded centre
    i = len(cells) // 2
    r = cells.iloc[i]
    ld = pd.read_csv(tiny_screen / "load_data.csv", dtype=str)  # metadata as prepare reads it
    site = ld[
        (ld.Metadata_Plate == r.Metadata_Plate)
        & (ld.Metadata_Well == r.Metadata_Well)
        & (ld.Metadata_Site == r.Metadata_Site)
    ].iloc[0]
    img = np.stack(
        [
            read_image(tiny_screen / site[f"PathName_{c}"] / site[f"FileName_{c}"])
            for c in arr.attrs["channels"]
        ]
    )
    illum = np.load(tiny_prep / "illum" / f"{r.Metadata_Plate}.npy")
    img = np.pad(apply_illumination(img, illum), ((0, 0), (24, 24), (24, 24)))
    y0, x0 = int(np.floor(r.Metadata_Cell_Center_Y)), int(np.floor(r.Metadata_Cell_Center_X))
    assert np.array_equal(arr[i], img[:, y0 : y0 + 48, x0 : x0 + 48])
    # nuclei found near the planted cells
    truth = pd.read_parquet(tiny_screen / "truth_cells.parquet")
    t = truth[
        (truth.Metadata_Plate == r.Metadata_Plate)
        & (truth.Metadata_Well == r.Metadata_Well)
        & (truth.Metadata_Site.astype(str) == r.Metadata_Site)  # prepare's metadata: text
    ]
    d = np.hypot(t.center_x - r.Metadata_Cell_Center_X, t.center_y - r.Metadata_Cell_Center_Y)
    assert d.min() < 6


def test_crop_dataset_normalises_as_recorded(tiny_prep):
    ds = CropDataset(tiny_prep, channels=["Mito", "DNA"])
    x = ds[3]
    assert x.dtype.is_floating_point and tuple(x.shape) == (2, 48, 48)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    key = ds.metadata.Metadata_ImageKey.iloc[3]
    stats = dict(zarr.open_array(str(tiny_prep / "crops.zarr")).attrs)["normalization"]["image"][
        key
    ]
    raw = ds.raw(3).astype(np.float32)
    lo, hi = np.array(stats["lo"])[[4, 0]], np.array(stats["hi"])[[4, 0]]
    expect = np.clip((raw - lo[:, None, None]) / (hi - lo)[:, None, None], 0, 1)
    assert np.allclose(x.numpy(), expect, atol=1e-6)
    # a batch read at once (DataLoader's __getitems__) equals the crops read one by one,
    # with repeats and any order, each normalised with its own image's percentiles
    rows = [7, 3, 7, 0, len(ds) - 1]
    batch = ds.__getitems__(rows)
    for r, t in zip(rows, batch):
        key = ds.metadata.Metadata_ImageKey.iloc[r]
        s = dict(zarr.open_array(str(tiny_prep / "crops.zarr")).attrs)["normalization"]["image"][
            key
        ]
        lo, hi = np.array(s["lo"])[[4, 0]], np.array(s["hi"])[[4, 0]]
        ref = np.clip(
            (ds.raw(r).astype(np.float32) - lo[:, None, None]) / (hi - lo)[:, None, None], 0, 1
        )
        assert np.allclose(t.numpy(), ref, atol=1e-6)
    fields = FieldDataset(tiny_prep)
    assert len(fields) == int(pd.read_parquet(tiny_prep / "images.parquet").QC_Pass.sum())
    assert tuple(fields[0].shape) == (5, 128, 128)


def test_resume_after_kill_gives_every_cell_once(tiny_screen, tmp_path):
    cfg = PrepareConfig(
        load_data=str(tiny_screen / "load_data.csv"),
        out_dir=str(tmp_path / "a"),
        qc_exclude=False,
        **FAST,
    )

    class Killed(Exception):
        pass

    def kill_after_7(n_done, key):
        if n_done == 7:
            raise Killed

    with pytest.raises(Killed):
        prepare(cfg, after_site=kill_after_7)
    assert not (tmp_path / "a" / "cells.parquet").exists()
    # also leave pixels written after the last commit point, as a kill mid-write would
    arr = zarr.open_array(str(tmp_path / "a" / "crops.zarr"), mode="r+")
    arr.resize((arr.shape[0] + 5, *arr.shape[1:]))
    seen = []
    prepare(cfg, after_site=lambda n, k: seen.append(k))
    assert len(seen) == 32 - 7  # only the rest was processed
    full = prepare(PrepareConfig(**{**cfg.__dict__, "out_dir": str(tmp_path / "b")}))
    a, b = (
        pd.read_parquet(tmp_path / "a" / "cells.parquet"),
        pd.read_parquet(full / "cells.parquet"),
    )
    assert a["Metadata_CellID"].is_unique
    assert list(a["Metadata_CellID"]) == list(b["Metadata_CellID"])
    za, zb = (
        zarr.open_array(str(tmp_path / "a" / "crops.zarr")),
        zarr.open_array(str(full / "crops.zarr")),
    )
    assert za.shape == zb.shape and np.array_equal(za[:], zb[:])


def _one_site(tmp_path, shapes=((64, 64), (64, 64)), blank=False):
    rng = np.random.default_rng(0)
    rows = {"Metadata_Plate": ["P"], "Metadata_Well": ["A01"], "Metadata_Site": [1]}
    for ch, shape in zip(("DNA", "ER"), shapes):
        img = rng.poisson(100, shape).astype(np.uint16)
        if not blank:
            yy, xx = np.mgrid[: shape[0], : shape[1]]
            img[(yy - 32) ** 2 + (xx - 32) ** 2 < 64] += 3000
        tifffile.imwrite(tmp_path / f"{ch}.tif", img)
        rows[f"FileName_{ch}"], rows[f"PathName_{ch}"] = [f"{ch}.tif"], [str(tmp_path)]
    pd.DataFrame(rows).to_csv(tmp_path / "ld.csv", index=False)
    return tmp_path / "ld.csv"


def test_truncated_file_raises_or_is_skipped(tiny_screen, tmp_path):
    ld = pd.read_csv(tiny_screen / "load_data.csv")
    bad = tmp_path / "bad.tif"
    src = tiny_screen / ld.PathName_ER[2] / ld.FileName_ER[2]
    bad.write_bytes(src.read_bytes()[:300])
    ld.loc[2, "PathName_ER"], ld.loc[2, "FileName_ER"] = str(tmp_path), "bad.tif"
    ld["PathName_DNA"] = [str(tiny_screen / p) for p in ld.PathName_DNA]
    for c in ("RNA", "AGP", "Mito"):
        ld[f"PathName_{c}"] = [str(tiny_screen / p) for p in ld[f"PathName_{c}"]]
    ld.loc[ld.index != 2, "PathName_ER"] = [
        str(tiny_screen / p) for p in ld.PathName_ER[ld.index != 2]
    ]
    ld.to_csv(tmp_path / "ld.csv", index=False)
    cfg = PrepareConfig(load_data=str(tmp_path / "ld.csv"), out_dir=str(tmp_path / "o"), **FAST)
    with pytest.raises(ImageReadError) as e:
        prepare(cfg)
    assert "bad.tif" in str(e.value) and "line 4 of" in str(e.value)  # data row 2, header = line 1
    out = prepare(PrepareConfig(**{**cfg.__dict__, "on_error": "skip"}))
    skipped = pd.read_parquet(out / "skipped.parquet")
    assert len(skipped) == 1 and skipped.file[0].endswith("bad.tif") and skipped.row[0] == 2
    assert "ImageReadError" in skipped.reason[0]
    cells = pd.read_parquet(out / "cells.parquet")
    assert not cells.Metadata_ImageKey.isin(skipped.Metadata_ImageKey).any() and len(cells)


def test_different_shapes_within_a_site(tmp_path):
    ld = _one_site(tmp_path, shapes=((64, 64), (64, 60)))
    with pytest.raises(ImageSetError, match="different shapes"):
        prepare(PrepareConfig(load_data=str(ld), out_dir=str(tmp_path / "o"), **FAST))


def test_empty_field_warns_and_gives_zero_cells(tmp_path, caplog):
    ld = _one_site(tmp_path, blank=True)
    cfg = PrepareConfig(
        load_data=str(ld), out_dir=str(tmp_path / "o"), qc_exclude=False, illumination=False, **FAST
    )
    logging.getLogger("celldino").propagate = True
    with caplog.at_level(logging.WARNING, logger="celldino"):
        out = prepare(cfg)
    assert "no cells found" in caplog.text
    assert len(pd.read_parquet(out / "cells.parquet")) == 0
    assert zarr.open_array(str(out / "crops.zarr")).shape == (0, 2, 32, 32)
    assert pd.read_parquet(out / "qc.parquet").QC_Flag_empty.all()


def test_nf1_with_cellprofiler_masks(cellpainting_fovs, tmp_path):
    root = cellpainting_fovs / "NF1_cellpainting_data_shrunken"
    cfg = PrepareConfig(
        image_dir=str(root / "Plate_2_images"),
        pattern="nf1",
        channel_map={"DAPI": "DNA", "GFP": "GFP", "RFP": "RFP"},
        segmentation="masks",
        mask_dir=str(root / "Plate_2_masks"),
        nuclei_masks="{stem_DNA}_MaskNuclei.tiff",
        cell_masks="{stem_RFP}_MaskCells.tiff",
        out_dir=str(tmp_path / "o"),
        illumination=False,
        features=False,
    )
    cells = pd.read_parquet(prepare(cfg) / "cells.parquet")
    # CellProfiler's 23-29 nuclei per site, minus any too close to the border for a 96 px crop
    assert cells.groupby("Metadata_Well").size().to_dict() == {
        "B7": 28,
        "D6": 27,
        "D7": 29,
        "F7": 25,
        "H12": 23,
    }


def test_pediatric_site_from_cellprofiler_locations(cellpainting_fovs, tmp_path):
    root = cellpainting_fovs / "pediatric_cancer_atlas_profiling"
    cmap = {"5": "DNA", "2": "ER", "6": "RNA", "3": "AGP", "4": "Mito", "1": "Brightfield"}
    cfg = PrepareConfig(
        image_dir=str(root / "images" / "orig"),
        pattern="opera_phenix",
        channel_map=cmap,
        plate="BR00143976",
        segmentation="locations",
        locations=str(root / "BR00143976_shrunken.parquet"),
        out_dir=str(tmp_path / "o"),
        illumination=False,
    )
    out = prepare(cfg)
    cells = pd.read_parquet(out / "cells.parquet")
    loc = pd.read_parquet(root / "BR00143976_shrunken.parquet")
    assert len(cells) == len(loc) == 5
    assert np.allclose(sorted(cells.Metadata_Cell_Center_X), sorted(loc.Nuclei_Location_Center_X))
    arr = zarr.open_array(str(out / "crops.zarr"))
    assert arr.shape == (5, 6, 96, 96) and arr.attrs["channels"][0] == "DNA"


@pytest.mark.slow
def test_jump_site_end_to_end_with_watershed_and_features(cellpainting_fovs, tmp_path):
    """The CPJUMP1 site (3 channels, ~180 nuclei per the data README): segmented by celldino."""
    root = cellpainting_fovs / "JUMP_plate_BR00117006" / "images" / "orig"
    cfg = PrepareConfig(
        image_dir=str(root),
        pattern="opera_phenix",
        channel_map={"5": "DNA", "2": "AGP", "3": "RNA"},
        channels=("DNA", "RNA", "AGP"),
        plate="BR00117006",
        cell_channel="AGP",
        illumination=False,
        qc_exclude=False,
        feature_families=("shape_intensity",),  # Texture of 180 real cells: seconds per cell
        out_dir=str(tmp_path / "o"),
    )
    out = prepare(cfg)
    cells = pd.read_parquet(out / "cells.parquet")
    feats = pd.read_parquet(out / "engineered.parquet")
    assert 120 <= len(cells) <= 240, len(cells)  # roughly 180 nuclei, border cells dropped
    assert zarr.open_array(str(out / "crops.zarr")).attrs["channels"] == ["DNA", "RNA", "AGP"]
    assert len(feats) == len(cells)
    assert list(feats.Metadata_CellID) == list(cells.Metadata_CellID)
    cp = [c for c in feats.columns if not c.startswith("Metadata_")]
    assert {c.split("_")[0] for c in cp} == {"Nuclei", "Cells", "Cytoplasm"}
    assert "Cells_Intensity_MeanIntensity_AGP" in cp and "Nuclei_Intensity_MeanIntensity_DNA" in cp
    whole = [c for c in cp if not c.startswith("Cytoplasm_")]  # no cytoplasm: NaN, by design
    assert np.isfinite(feats[whole].to_numpy(float)).mean() > 0.99


def _planted_vignetting(truth: pd.Series, h: int, w: int) -> np.ndarray:
    """The synthetic screen's flat field (synth.render.camera), scaled to a minimum of 1."""
    yy, xx = np.mgrid[0:h, 0:w]
    r2 = ((xx - truth.vignette_x) ** 2 + (yy - truth.vignette_y) ** 2) / (0.5 * (h**2 + w**2))
    vig = 1 - truth.vignette * r2
    return vig / vig.min()


def _illumination_errors(screen) -> tuple[dict, dict]:
    from celldino.data.illumination import IlluminationAccumulator
    from celldino.io.tables import read_load_data

    df, chans = read_load_data(screen / "load_data.csv")
    from celldino.data.imagesets import ImageSet

    iset = ImageSet(df, chans)
    acc = IlluminationAccumulator()
    for i in range(len(iset)):
        acc.add(str(iset.table.at[i, "Metadata_Plate"]), iset.read(i), key=iset.key(i))
    passing = set(iset.table.loc[iset.table.Metadata_QC_Truth == "ok", "Metadata_ImageKey"])
    fns, report = acc.functions(passing=passing)
    truth = pd.read_parquet(screen / "truth_images.parquet").groupby("Metadata_Plate").first()
    errors = {}
    for plate, fn in fns.items():
        want = _planted_vignetting(truth.loc[plate], *fn.shape[1:])
        rel = fn / want[None] - 1
        errors[plate] = (
            [float(np.abs(r).max()) for r in rel],
            [float(np.sqrt((r**2).mean())) for r in rel],
        )
    return errors, report


def test_illumination_within_5_percent_of_planted_vignetting_demo(demo_screen):
    """demo (30-32 QC-passing sites per plate): every channel's function is within 5 % of the
    planted vignetting at every pixel (true range 1.14-1.22x; measured worst pixel 2.4 %)."""
    errors, report = _illumination_errors(demo_screen)
    assert len(errors) == 4
    for plate, (worst, _) in errors.items():
        assert max(worst) < 0.05, (plate, worst)
        assert all(ch["status"] == "applied" for ch in report[plate]["channels"])
        assert not report[plate]["warnings"]


def test_illumination_on_tiny_applied_within_8_percent_or_flat_and_warned(tiny_screen):
    """tiny (14-16 QC-passing sites of 128 px per plate): a channel's function is applied only
    when two random halves of the images agree within 10 % (issue 21); an applied one is within
    6.5 % of the planted vignetting in RMS and 8 % at its worst pixel (a corner); one left flat is
    warned about by plate and channel (measured: 3 of 10 applied, within 6.0 % RMS, 7.6 % worst
    pixel; 2 of them within 2 % RMS)."""
    errors, report = _illumination_errors(tiny_screen)
    applied = 0
    for plate, (worst, rms) in errors.items():
        for c, ch in enumerate(report[plate]["channels"]):
            if ch["status"] == "applied":
                applied += 1
                assert rms[c] < 0.065 and worst[c] < 0.08, (plate, c, rms[c], worst[c])
                assert ch["disagreement"] <= 0.1
            else:
                assert ch["status"].startswith("flat: "), (plate, ch)
                warned = f"channel {ch['channel']}: not corrected"
                assert any(warned in w for w in report[plate]["warnings"]), (plate, ch)
    assert applied >= 2


NF1_MASKS = dict(
    pattern="nf1",
    channel_map={"DAPI": "DNA", "GFP": "GFP", "RFP": "RFP"},
    segmentation="masks",
    nuclei_masks="{stem_DNA}_MaskNuclei.tiff",
    cell_masks="{stem_RFP}_MaskCells.tiff",
    features=False,
    crop_size=32,
    save_masks=True,
    save_outlines=True,
)


def test_nf1_binary_cell_masks_split_by_nuclei_and_saved(cellpainting_fovs, tmp_path):
    """CellProfiler's binary MaskCells (touching cells merged into blobs) split into one cell
    per CellProfiler nucleus; the saved masks round-trip and match cells.parquet."""
    from celldino.data.user_masks import labels_from_mask
    from celldino.io.masks import outline_path, read_masks

    root = cellpainting_fovs / "NF1_cellpainting_data_shrunken"
    out = prepare(
        PrepareConfig(
            image_dir=str(root / "Plate_2_images"),
            mask_dir=str(root / "Plate_2_masks"),
            out_dir=str(tmp_path / "o"),
            **NF1_MASKS,
        )
    )
    cells = pd.read_parquet(out / "cells.parquet")
    assert len(cells) == 132
    # NF1's images are already corrected: five sites are too few to tell a flat field from where
    # the cells lie (fitted, DAPI read 1.13x and GFP 6.1x), so the plate is not corrected and a
    # warning says so: the images are not distorted
    report = json.loads((out / "prepare.json").read_text())["illumination_report"]
    (plate,) = report.values()
    assert plate["n_images"] == 5 and "illum_min_images=10" in plate["warnings"][0]
    assert [ch["range"] for ch in plate["channels"]] == [1.0, 1.0, 1.0]
    (fn,) = [np.load(f) for f in (out / "illum").iterdir()]
    assert (fn == 1.0).all()
    split = 0
    for key, rows in cells.groupby("Metadata_ImageKey"):
        well = rows.Metadata_Well.iloc[0]
        ref_n = labels_from_mask(read_image(next(root.glob(f"Plate_2_masks/{well}_*Nuclei.tiff"))))
        binary = read_image(next(root.glob(f"Plate_2_masks/{well}_*MaskCells.tiff"))) > 0
        nuclei, cells_lab = read_masks(out, key)
        assert nuclei.dtype == np.uint16 and nuclei.shape == binary.shape
        # one cell per CellProfiler nucleus (23-29 per site), the nuclei as CellProfiler's
        assert len(rows) == len(np.unique(ref_n[ref_n > 0])) == nuclei.max()
        assert (np.unique(cells_lab[cells_lab > 0]) == np.arange(1, nuclei.max() + 1)).all()
        # cells tile the blobs that hold a nucleus (plus nuclei outside the mask), each cell
        # holding its own nucleus
        blobs, _ = ndi.label(binary | (nuclei > 0))
        held = np.isin(blobs, np.unique(blobs[nuclei > 0]))
        assert ((cells_lab > 0) == (held & (blobs > 0))).all()
        inside = [k for k in range(1, nuclei.max() + 1) if binary[nuclei == k].mean() > 0.5]
        for k in inside:
            assert (cells_lab[nuclei == k] == k).all()
            assert (cells_lab == k).sum() > (nuclei == k).sum()
        split += len(inside)
        # the table's areas are the saved masks' areas
        n_area = np.bincount(nuclei.ravel())
        c_area = np.bincount(cells_lab.ravel())
        ids = rows.Metadata_ObjectNumber.to_numpy()
        assert (rows.Metadata_Nuclei_Area.to_numpy() == n_area[ids]).all()
        assert (rows.Metadata_Cells_Area.to_numpy() == c_area[ids]).all()
        rgb = np.asarray(__import__("PIL.Image").Image.open(outline_path(out, key)))
        assert rgb.shape == (*binary.shape, 3)
        assert (rgb == (0, 255, 0)).all(-1).sum() > 100  # nuclei outlines drawn
    # was 4-15 blobs per site (116 of 132 cells = their nucleus); now each nucleus in a blob
    # gets its own cell: 94 of them (the other 38 have no cell in CellProfiler's mask)
    assert split == 94


def _cellpose_layout(tiny_screen, folder, n_sites=2):
    """The tiny screen's true labels saved as Cellpose saves them: nuclei as `_seg.npy` (a dict
    pickled by numpy.save, labels under 'masks'), cells as `_cp_masks.png` (16-bit labels)."""
    from PIL import Image

    ld = pd.read_csv(tiny_screen / "load_data.csv")
    ld = ld[ld.Metadata_QC_Truth == "ok"].head(n_sites)
    folder.mkdir()
    for _, r in ld.iterrows():
        stem = r.FileName_DNA.removesuffix("_DNA.tif")
        truth = tiny_screen / "masks" / r.Metadata_Plate
        nuc = tifffile.imread(truth / f"{stem}_nuclei.tif")
        cell = tifffile.imread(truth / f"{stem}_cells.tif")
        seg = {
            "masks": nuc,
            "outlines": np.zeros_like(nuc),
            "chan_choose": [0, 0],
            "ismanual": np.zeros(int(nuc.max()), bool),
            "filename": str(truth / f"{stem}_DNA.tif"),
            "flows": [],
            "est_diam": 13.0,
        }
        np.save(folder / f"{stem}_DNA_seg.npy", seg)
        Image.fromarray(cell.astype(np.uint16)).save(folder / f"{stem}_DNA_cp_masks.png")
    path = folder.parent / "ld.csv"
    ld.to_csv(path, index=False)
    return path, ld


def test_cellpose_outputs_read_by_name(tiny_screen, tmp_path):
    from celldino.io.masks import read_masks

    ld_path, ld = _cellpose_layout(tiny_screen, tmp_path / "cp")
    out = prepare(
        PrepareConfig(
            load_data=str(ld_path),
            segmentation="masks",
            mask_dir=str(tmp_path / "cp"),
            nuclei_masks="{stem_DNA}_seg.npy",
            cell_masks="{stem_DNA}_cp_masks.png",
            out_dir=str(tmp_path / "o"),
            features=False,
            crop_size=32,
            qc_exclude=False,
            save_masks=True,
        )
    )
    cells = pd.read_parquet(out / "cells.parquet")
    truth = pd.read_parquet(tiny_screen / "truth_cells.parquet")
    for key, rows in cells.groupby("Metadata_ImageKey"):
        plate, well, _ = key.split("/")
        stem = ld.loc[ld.Metadata_Well == well, "FileName_DNA"].iloc[0].removesuffix("_DNA.tif")
        nuc_true = tifffile.imread(tiny_screen / "masks" / plate / f"{stem}_nuclei.tif")
        nuclei, cells_lab = read_masks(out, key)
        # the label masks used as they are (renumbered 1..n in the same order)
        present = np.unique(nuc_true[nuc_true > 0])
        assert len(rows) == len(present) == nuclei.max()
        assert ((nuclei > 0) == (nuc_true > 0)).all()
        n_true = truth[(truth.Metadata_Plate == plate) & (truth.Metadata_Well == well)]
        assert len(rows) <= len(n_true)
        assert (cells_lab[nuclei > 0] == nuclei[nuclei > 0]).mean() > 0.95
