"""bench/real_cells_engineered.py on six real BBBC021 crops: the statistics against numpy, the
centre cell's masks against CellProfiler's (cp_measure's) own area and intensity measurements."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location(
        "real_cells_engineered", ROOT / "bench" / "real_cells_engineered.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _crops(shared_data: Path) -> np.ndarray:
    images = np.load(shared_data / "bbbc021_crops" / "crops_mini.npz")["images"]
    return images[[0, 100, 200, 300, 400, 500]]  # (6, 68, 68, 3) uint16


def test_intensity_stats_match_numpy(shared_data):
    rce = _module()
    x = _crops(shared_data)[:, 2:66, 2:66, :].astype(np.float32) / 65535
    feats, names = rce.intensity_stats(x)
    assert feats.shape == (6, 30) and len(names) == 30
    col = {n: feats[:, i] for i, n in enumerate(names)}
    for c in range(3):
        px = x[..., c].reshape(6, -1).astype(np.float64)  # float32 sums differ by ~1e-5
        np.testing.assert_allclose(col[f"mean_ch{c}"], px.mean(1), rtol=1e-4)
        np.testing.assert_allclose(col[f"p50_ch{c}"], np.median(px, axis=1), rtol=1e-5)
        above = px > px.mean(1, keepdims=True)
        np.testing.assert_allclose(col[f"frac_above_mean_ch{c}"], above.mean(1), rtol=1e-5)
        # |d/dx| by hand: central differences inside, one-sided at the edges
        img = x[..., c]
        dx = np.concatenate(
            [img[:, :, 1:2] - img[:, :, :1], (img[:, :, 2:] - img[:, :, :-2]) / 2,
             img[:, :, -1:] - img[:, :, -2:-1]], axis=2
        )  # fmt: skip
        dy = np.swapaxes(img, 1, 2)
        dy = np.concatenate(
            [dy[:, :, 1:2] - dy[:, :, :1], (dy[:, :, 2:] - dy[:, :, :-2]) / 2,
             dy[:, :, -1:] - dy[:, :, -2:-1]], axis=2
        )  # fmt: skip
        expect = (np.abs(dx).mean((1, 2)) + np.abs(dy).mean((1, 2))) / 2
        np.testing.assert_allclose(col[f"mean_abs_gradient_ch{c}"], expect, rtol=1e-4)


def test_centre_cell_masks_match_cellprofiler_measurements(shared_data, tmp_path):
    rce = _module()
    crops = _crops(shared_data)
    masks = [rce.segment_centre_cell(c) for c in crops]
    for nuc, cell, fell_back in masks:
        assert not fell_back and nuc[34, 34]  # every one of these has a nucleus at the centre
        assert np.all(cell[nuc]) and cell.sum() > nuc.sum()  # the nucleus lies inside its cell
    cache = tmp_path  # a folder: bbbc021_cp_<families>.npz in it
    feats, names = rce.cellprofiler_features(crops, cache=cache, families="shape_intensity")
    col = {n: feats[:, i] for i, n in enumerate(names)}
    area_n = np.array([m[0].sum() for m in masks])
    area_c = np.array([m[1].sum() for m in masks])
    np.testing.assert_array_equal(col["Nuclei_AreaShape_Area"], area_n)
    np.testing.assert_array_equal(col["Cells_AreaShape_Area"], area_c)
    dna = np.array([c[..., 0][m[0]].mean() / 65535 for c, m in zip(crops, masks)])
    np.testing.assert_allclose(col["Nuclei_Intensity_MeanIntensity_DNA"], dna, rtol=1e-5)
    actin_cyto = np.array([c[..., 2][m[1] & ~m[0]].mean() / 65535 for c, m in zip(crops, masks)])
    np.testing.assert_allclose(
        col["Cytoplasm_Intensity_MeanIntensity_Actin"], actin_cyto, rtol=1e-5
    )
    again, names2 = rce.cellprofiler_features(crops, cache=cache, families="shape_intensity")
    assert names2 == names and np.array_equal(again, feats)  # read back from the cache
    part, names3 = rce.cellprofiler_features(crops[[4, 1]], cache=cache, families="shape_intensity")
    i = names3.index("Nuclei_AreaShape_Area")
    np.testing.assert_array_equal(part[:, i], area_n[[4, 1]])  # a subset: rows of its crops
    z = np.load(tmp_path / "bbbc021_cp_shape_intensity.npz")  # for readers without the crops
    j = list(z["names"]).index("Nuclei_AreaShape_Area")
    np.testing.assert_array_equal(z["features"][:, j], area_n)
