"""Engineered features against independent computations (regionprops, graycoprops, numpy)."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.draw import ellipse
from skimage.feature import graycomatrix, graycoprops
from skimage.measure import regionprops

from celldino.data.engineered import cell_features, haralick, radial_distribution, shape_features


def _scene():
    nuclei = np.zeros((80, 80), np.int32)
    cells = np.zeros((80, 80), np.int32)
    cells[ellipse(40, 40, 25, 18, rotation=0.4)] = 1
    nuclei[ellipse(40, 40, 10, 7, rotation=0.4)] = 1
    rng = np.random.default_rng(1)
    img = rng.uniform(100, 200, (2, 80, 80)).astype(np.float32)
    img[0][nuclei == 1] += 1000
    return img, nuclei, cells


def test_shape_matches_regionprops():
    _, nuclei, cells = _scene()
    f = shape_features(cells == 1)
    p = regionprops(cells)[0]
    assert f["Area"] == p.area and f["Perimeter"] == pytest.approx(p.perimeter)
    assert f["Eccentricity"] == pytest.approx(p.eccentricity)
    assert f["Solidity"] == pytest.approx(p.solidity)
    assert f["FormFactor"] == pytest.approx(4 * np.pi * p.area / p.perimeter**2)
    assert 0.8 < f["FormFactor"] < 1.2  # an ellipse is nearly round by this measure


def test_cell_features_intensity_by_compartment():
    img, nuclei, cells = _scene()
    df = cell_features(img, nuclei, cells, ["DNA", "ER"])
    assert len(df) == 1 and all(c.startswith("CP_") for c in df.columns)
    cyto = (cells == 1) & (nuclei == 0)
    row = df.iloc[0]
    assert row["CP_Nuclei_Intensity_MeanIntensity_DNA"] == pytest.approx(img[0][nuclei == 1].mean())
    assert row["CP_Cytoplasm_Intensity_MedianIntensity_ER"] == pytest.approx(
        np.median(img[1][cyto])
    )
    assert row["CP_Cells_Intensity_IntegratedIntensity_DNA"] == pytest.approx(
        img[0][cells == 1].sum(), rel=1e-5
    )
    assert row["CP_Nuclei_AreaShape_Area"] == (nuclei == 1).sum()
    # the DNA sits in the middle: more intensity fraction in the inner ring than the outer
    assert row["CP_Cells_RadialDistribution_MeanFrac_DNA_1of4"] > 1.5
    assert row["CP_Cells_RadialDistribution_MeanFrac_ER_4of4"] == pytest.approx(1.0, abs=0.1)


def test_haralick_equals_graycoprops_on_a_full_rectangle():
    rng = np.random.default_rng(2)
    img = rng.integers(0, 16, (30, 40)).astype(np.float32)
    img[0, 0], img[0, 1] = 0, 15  # full range → levels map 1:1
    mask = np.ones(img.shape, bool)
    ours = haralick(img, mask, levels=16, distance=3)
    q = img.astype(np.uint8)
    angles = [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4]
    # our masked GLCM drops pairs that leave the object, like graycomatrix's image edge
    P = graycomatrix(q, [3], angles, levels=16, symmetric=True, normed=True)
    for ours_name, theirs in [
        ("Contrast", "contrast"),
        ("Homogeneity", "homogeneity"),
        ("AngularSecondMoment", "ASM"),
        ("Correlation", "correlation"),
    ]:
        assert ours[ours_name] == pytest.approx(graycoprops(P, theirs).mean(), rel=1e-6), ours_name
    p0 = P[:, :, 0, 0]
    ent = -(p0[p0 > 0] * np.log2(p0[p0 > 0])).sum()
    ent_all = [
        (-(P[:, :, 0, a][P[:, :, 0, a] > 0] * np.log2(P[:, :, 0, a][P[:, :, 0, a] > 0])).sum())
        for a in range(4)
    ]
    assert ours["Entropy"] == pytest.approx(np.mean(ent_all)) and ent > 0


def test_radial_distribution_fractions():
    _, nuclei, cells = _scene()
    flat = np.ones((80, 80), np.float32)
    r = radial_distribution(flat, cells == 1, nuclei == 1, bins=4)
    fracs = [r[f"FracAtD_{b}of4"] for b in range(1, 5)]
    assert sum(fracs) == pytest.approx(1.0)
    # uniform intensity: each ring's intensity fraction equals its area fraction
    assert all(r[f"MeanFrac_{b}of4"] == pytest.approx(1.0) for b in range(1, 5))
