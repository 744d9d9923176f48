"""Segmentation against CellProfiler's own masks (real NF1 sites) and hand-built scenes."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.draw import disk

from celldino.data.segmentation import (
    expand_nuclei,
    labels_from_mask,
    match_cells,
    object_f1,
    segment_cells,
    segment_nuclei,
)
from celldino.io.images import read_image

NF1_SITES = ["B7_01_1_3", "D6_01_1_2", "D7_01_1_1", "F7_01_1_2", "H12_01_1_1"]


@pytest.mark.parametrize("site", NF1_SITES)
def test_nuclei_match_cellprofiler_on_nf1(cellpainting_fovs, site):
    root = cellpainting_fovs / "NF1_cellpainting_data_shrunken"
    dna = read_image(root / "Plate_2_images" / f"{site}_DAPI_001.tif")
    ref = labels_from_mask(read_image(root / "Plate_2_masks" / f"{site}_DAPI_001_MaskNuclei.tiff"))
    assert 20 <= ref.max() <= 30  # CellProfiler's 23 to 29 nuclei
    pred = segment_nuclei(dna)
    score = object_f1(pred, ref, iou=0.5)
    print(f"{site}: object F1 {score['f1']:.3f}")  # pytest -s shows the per-site F1
    assert score["f1"] >= 0.8, score


def test_touching_nuclei_are_split():
    img = np.zeros((80, 120), np.float32)
    for cy, cx in [(40, 45), (40, 71)]:  # two discs of radius 14 overlapping by 2 px
        img[disk((cy, cx), 14, shape=img.shape)] = 1000
    img += np.random.default_rng(0).normal(100, 5, img.shape).astype(np.float32)
    for kw in ({}, {"smooth_sigma": 1.0, "min_area": 50, "min_distance": 8}):
        lab = segment_nuclei(img, **kw)
        assert lab.max() == 2, kw
        # each label is one disc: IoU with the true disc (log-MCE puts the edge low on the blur)
        for cy, cx in [(40, 45), (40, 71)]:
            true = np.zeros(img.shape, bool)
            true[disk((cy, cx), 14, shape=img.shape)] = True
            k = np.bincount(lab[true]).argmax()
            assert k > 0 and (true & (lab == k)).sum() / (true | (lab == k)).sum() > 0.75, kw


def test_size_filter_and_empty_field():
    img = np.zeros((64, 64), np.float32)
    img[disk((20, 20), 10)] = 500
    img[disk((45, 45), 2)] = 500  # 13 px: below min_area
    lab = segment_nuclei(img, smooth_sigma=0.5, min_area=50)
    assert lab.max() == 1 and lab[20, 20] == 1
    assert segment_nuclei(np.full((32, 32), 7.0)).max() == 0


def test_cells_seeded_by_nuclei_keep_labels():
    nuc = np.zeros((60, 100), np.int32)
    nuc[disk((30, 25), 6)] = 1
    nuc[disk((30, 75), 6)] = 2
    body = np.zeros((60, 100), np.float32)
    body[disk((30, 25), 18)] = 300
    body[disk((30, 75), 18)] = 300
    cells = segment_cells(body, nuc, smooth_sigma=1.0)
    assert set(np.unique(cells)) == {0, 1, 2}
    assert np.all(cells[nuc > 0] == nuc[nuc > 0])
    assert abs((cells == 1).sum() - np.pi * 18**2) < 0.2 * np.pi * 18**2
    grown = expand_nuclei(nuc, 5)
    assert (grown == 1).sum() == pytest.approx(np.pi * 11**2, rel=0.1)


def test_object_f1_hand_example_and_mask_helpers():
    ref = np.zeros((10, 30), np.int32)
    ref[2:6, 2:6] = 1  # 16 px
    ref[2:6, 12:16] = 2
    pred = np.zeros_like(ref)
    pred[2:6, 2:6] = 1  # exact match
    pred[2:6, 14:18] = 2  # IoU 8 / 24 = 0.33: no match
    pred[2:4, 24:26] = 3  # false positive
    s = object_f1(pred, ref, 0.5)
    assert (s["tp"], s["precision"], s["recall"]) == (1, 1 / 3, 0.5)
    assert s["f1"] == pytest.approx(2 * (1 / 3) * 0.5 / (1 / 3 + 0.5))
    binary = (ref > 0).astype(np.uint8) * 255
    assert labels_from_mask(binary).max() == 2
    cells = np.where(ref > 0, 7 - ref, 0)  # labels swapped: 6 and 5
    assert np.array_equal(match_cells(ref, cells), ref)


def test_object_f1_counts_unique_labels_that_skip_numbers():
    # reference labels 3 and 40 (two objects, max() would say 40); prediction labels 7 and 9
    ref = np.zeros((12, 40), np.int32)
    ref[1:5, 1:5] = 3
    ref[1:5, 20:24] = 40
    pred = np.zeros_like(ref)
    pred[1:5, 1:5] = 9  # exact match of ref 3
    pred[7:11, 30:34] = 7  # a false positive
    s = object_f1(pred, ref, 0.5)
    # by hand: 1 match, 2 predicted objects, 2 reference objects
    assert (s["tp"], s["n_pred"], s["n_ref"]) == (1, 2, 2)
    assert (s["precision"], s["recall"], s["f1"]) == (0.5, 0.5, 0.5)
    # no background at all: every label is an object
    full = np.full((4, 4), 5, np.int32)
    assert object_f1(full, full)["tp"] == 1 and object_f1(full, full)["n_ref"] == 1
