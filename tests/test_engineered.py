"""Engineered features (CellProfiler's measurements through cp_measure) against independent
computations (numpy, skimage.measure.regionprops, pycytominer's feature inference) and against
CellProfiler's own values for a real NF1 cell."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
from skimage.draw import ellipse
from skimage.measure import regionprops

from celldino.config import CHOICES, Config, PrepareConfig, check
from celldino.data.engineered import (
    FAMILIES,
    FEATURE_SETS,
    FeatureScaleError,
    cell_features,
    feature_names,
    resolve_families,
)


def _scene():
    """Two cells with nuclei in a uint16 2-channel image; cell 2's nucleus fills it."""
    nuclei = np.zeros((90, 120), np.int32)
    cells = np.zeros((90, 120), np.int32)
    cells[ellipse(40, 40, 25, 18, rotation=0.4)] = 1
    nuclei[ellipse(40, 40, 10, 7, rotation=0.4)] = 1
    cells[ellipse(45, 95, 8, 8)] = 2
    nuclei[ellipse(45, 95, 8, 8)] = 2
    rng = np.random.default_rng(1)
    img = rng.uniform(1000, 3000, (2, 90, 120)).astype(np.uint16)
    img[0][nuclei > 0] += 20000
    img[1] = (img[1] + 0.5 * img[0]).astype(np.uint16)  # ER follows DNA: positive correlation
    return img, nuclei, cells


@pytest.fixture(scope="module")
def scene_features():
    img, nuclei, cells = _scene()
    return img, nuclei, cells, cell_features(img, nuclei, cells, ["DNA", "ER"])


def test_intensity_by_compartment_matches_numpy(scene_features):
    img, nuclei, cells, df = scene_features
    assert len(df) == 2
    px = img.astype(np.float64) / 65535  # CellProfiler reads 16-bit images on 0..1
    cyto = (cells == 1) & (nuclei == 0)
    row = df.iloc[0]
    assert row["Nuclei_Intensity_MeanIntensity_DNA"] == pytest.approx(px[0][nuclei == 1].mean())
    assert row["Cytoplasm_Intensity_MeanIntensity_ER"] == pytest.approx(px[1][cyto].mean())
    assert row["Cells_Intensity_IntegratedIntensity_DNA"] == pytest.approx(px[0][cells == 1].sum())
    assert row["Cells_Intensity_StdIntensity_ER"] == pytest.approx(px[1][cells == 1].std())
    assert row["Cytoplasm_Intensity_MaxIntensity_DNA"] == pytest.approx(px[0][cyto].max())
    r = np.corrcoef(px[0][cells == 1], px[1][cells == 1])[0, 1]
    assert row["Cells_Correlation_Correlation_DNA_ER"] == pytest.approx(r, rel=1e-6)


def test_shape_matches_regionprops(scene_features):
    _, nuclei, cells, df = scene_features
    for comp, lab in (("Nuclei", nuclei), ("Cells", cells)):
        p = regionprops(lab)[0]
        row = df.iloc[0]
        assert row[f"{comp}_AreaShape_Area"] == p.area
        assert row[f"{comp}_AreaShape_Eccentricity"] == pytest.approx(p.eccentricity)
        assert row[f"{comp}_AreaShape_Solidity"] == pytest.approx(p.solidity)
        assert row[f"{comp}_AreaShape_MajorAxisLength"] == pytest.approx(p.axis_major_length)
        per = row[f"{comp}_AreaShape_Perimeter"]
        assert row[f"{comp}_AreaShape_FormFactor"] == pytest.approx(4 * np.pi * p.area / per**2)
    assert df.iloc[0]["Cytoplasm_AreaShape_Area"] == ((cells == 1) & (nuclei == 0)).sum()


def test_cellprofiler_names_and_missing_cytoplasm(scene_features):
    _, _, _, df = scene_features
    cols = set(df.columns)
    for name in (
        "Cells_AreaShape_Zernike_3_1",
        "Cells_AreaShape_MaxFeretDiameter",
        "Nuclei_Intensity_MADIntensity_DNA",
        "Cytoplasm_Texture_AngularSecondMoment_ER_3_00_256",
        "Cells_Texture_InfoMeas2_DNA_3_03_256",
        "Nuclei_Granularity_1_DNA",
        "Cells_Granularity_16_ER",
        "Cells_RadialDistribution_FracAtD_DNA_1of4",
        "Cytoplasm_RadialDistribution_ZernikeMagnitude_ER_2_0",
        "Cells_Correlation_Manders_ER_DNA",
        "Nuclei_Correlation_RWC_DNA_ER",
    ):
        assert name in cols, name
    # positions in the field are not morphology
    assert not [c for c in cols if "Location" in c or "Center" in c or "BoundingBoxM" in c]
    assert all(c.split("_")[0] in ("Nuclei", "Cells", "Cytoplasm") for c in cols)
    # pycytominer recognises every column as a CellProfiler feature
    from pycytominer.cyto_utils import infer_cp_features

    assert sorted(infer_cp_features(df)) == sorted(cols)
    assert list(df.columns) == feature_names(["DNA", "ER"])
    # cell 2: its nucleus fills it, so no cytoplasm (NaN), while Nuclei and Cells are measured
    row = df.iloc[1]
    assert np.isnan(row["Cytoplasm_AreaShape_Area"])
    assert row["Nuclei_AreaShape_Area"] == row["Cells_AreaShape_Area"] > 150


def test_cell_ids_order_and_families():
    img, nuclei, cells = _scene()
    df = cell_features(
        img, nuclei, cells, ["DNA", "ER"], cell_ids=[2, 1], families="shape_intensity"
    )
    assert {c.split("_")[1] for c in df.columns} == {"AreaShape", "Intensity"}
    assert df["Cells_AreaShape_Area"].tolist() == [(cells == 2).sum(), (cells == 1).sum()]
    assert resolve_families(("fast", "Texture")) == (
        "AreaShape",
        "Intensity",
        "RadialDistribution",
        "Texture",
        "Correlation",
    )
    with pytest.raises(ValueError, match="Haralick"):
        resolve_families("Haralick")
    # the config's choices are exactly the sets and families
    assert set(CHOICES["prepare.feature_families"]) == set(FEATURE_SETS) | set(FAMILIES)
    cfg = dataclasses.replace(Config(), prepare=PrepareConfig(feature_families=("Haralick",)))
    assert [k for k, _ in check(cfg)] == ["prepare.feature_families"]


def test_float_images_outside_unit_range_refused_for_texture():
    img, nuclei, cells = _scene()
    with pytest.raises(FeatureScaleError, match="feature_scale"):
        cell_features(img.astype(np.float32), nuclei, cells, ["DNA", "ER"], families="Texture")
    # with the scale given, the float image measures as the uint16 one
    a = cell_features(
        img.astype(np.float32), nuclei, cells, ["DNA", "ER"], families="Texture", scale=65535
    )
    b = cell_features(img, nuclei, cells, ["DNA", "ER"], families="Texture")
    pd.testing.assert_frame_equal(a, b)


def test_nf1_nucleus_agrees_with_cellprofiler(cellpainting_fovs):
    """NF1 D7 site 1, the reference nucleus, from CellProfiler's own nuclei mask.

    Shape features are defined identically and the object is the same: they must agree to
    1e-6. The images given differ from those CellProfiler measured by a near-constant offset
    (its MaxIntensity is 0.048 lower while its StdIntensity is the same), so offset-free
    intensity features agree to 0.1 %, and MeanIntensity - MaxIntensity to 1e-4 of full scale.
    """
    import tifffile
    from scipy import ndimage as ndi

    nf1 = cellpainting_fovs / "NF1_cellpainting_data_shrunken"
    ref = pd.read_parquet(nf1 / "Plate_2_with_image_data_shrunken.parquet")
    r = ref[(ref.Image_Metadata_Well_x == "D7") & (ref.Image_Metadata_Site_x.astype(int) == 1)]
    r = r.iloc[0]
    chans = ["DAPI", "GFP", "RFP"]
    img = np.stack(
        [
            tifffile.imread(nf1 / "Plate_2_images" / f"D7_01_{k}_1_{c}_001.tif")
            for k, c in zip((1, 2, 3), chans)
        ]
    )
    nuclei, _ = ndi.label(
        tifffile.imread(nf1 / "Plate_2_masks" / "D7_01_1_1_DAPI_001_MaskNuclei.tiff") > 0
    )
    nid = nuclei[int(round(r.Nuclei_Location_Center_Y)), int(round(r.Nuclei_Location_Center_X))]
    assert nid > 0
    one = np.where(nuclei == nid, 1, 0).astype(np.int32)
    df = cell_features(img, one, one, chans, families="shape_intensity").iloc[0]
    for f in (
        "Area",
        "Perimeter",
        "FormFactor",
        "Eccentricity",
        "Solidity",
        "MajorAxisLength",
        "Zernike_2_0",
        "Zernike_5_3",
    ):
        assert df[f"Nuclei_AreaShape_{f}"] == pytest.approx(r[f"Nuclei_AreaShape_{f}"], rel=1e-6), f
    for c in chans:
        assert df[f"Nuclei_Intensity_StdIntensity_{c}"] == pytest.approx(
            r[f"Nuclei_Intensity_StdIntensity_{c}"], rel=1e-3
        ), c
        ours = df[f"Nuclei_Intensity_MeanIntensity_{c}"] - df[f"Nuclei_Intensity_MaxIntensity_{c}"]
        theirs = r[f"Nuclei_Intensity_MeanIntensity_{c}"] - r[f"Nuclei_Intensity_MaxIntensity_{c}"]
        assert ours == pytest.approx(theirs, abs=1e-4), c


def test_granularity_of_cells_from_parts_equals_cp_measure_on_cells(scene_features):
    """cell_features measures Granularity once for nuclei + cytoplasm and derives the cells;
    cp_measure run on the cell objects themselves must give the same numbers."""
    from cp_measure.bulk import get_core_measurements

    img, nuclei, cells, df = scene_features
    gran = get_core_measurements()["granularity"]
    for c, ch in enumerate(["DNA", "ER"]):
        px = img[c].astype(np.float64) / 65535
        direct = gran(cells, px)
        nuc_direct = gran(nuclei, px)
        for k in (1, 2, 5, 16):
            np.testing.assert_allclose(
                df[f"Cells_Granularity_{k}_{ch}"], direct[f"Granularity_{k}"], rtol=1e-9, atol=1e-12
            )
            np.testing.assert_allclose(
                df[f"Nuclei_Granularity_{k}_{ch}"],
                nuc_direct[f"Granularity_{k}"],
                rtol=1e-9,
                atol=1e-12,
            )


def test_texture_and_intensity_equal_cp_measure_reference_implementation(scene_features):
    """celldino uses cp_measure's numba Texture/Intensity when numba is installed: the numbers
    must be those of cp_measure's plain NumPy implementation (the CellProfiler port)."""
    pytest.importorskip("numba")  # without it both sides are the plain code
    from cp_measure.bulk import get_core_measurements

    img, _, cells, df = scene_features
    core = get_core_measurements(legacy=True)  # no accelerator set: the reference code
    px = img[1].astype(np.float64) / 65535
    tex = core["texture"](cells, px)
    ints = core["intensity"](cells, px)
    for k in ("AngularSecondMoment", "Entropy", "InfoMeas1", "Correlation"):
        np.testing.assert_allclose(
            df[f"Cells_Texture_{k}_ER_3_02_256"], tex[f"{k}_3_02_256"], rtol=1e-9
        )
    for k in ("MedianIntensity", "MADIntensity", "MassDisplacement"):
        np.testing.assert_allclose(df[f"Cells_Intensity_{k}_ER"], ints[f"Intensity_{k}"], rtol=1e-9)
