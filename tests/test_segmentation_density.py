"""Nuclei from sparse to confluent fields against the synthetic truth (issue 21, dense small nuclei).

Small fields of `celldino.synth.nuclei` (densities given per 512² as in the bench, drawn on 256²
fields to stay fast); the full grid and the real sets are in bench/bench_segmentation.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from celldino.data.segmentation import estimate_nucleus_diameter, object_f1, segment_nuclei
from celldino.synth.nuclei import coverage, nuclei_field, touching_fraction


def _pooled_f1(rows: list[dict]) -> float:
    tp = sum(r["tp"] for r in rows)
    return 2 * tp / (sum(r["n_pred"] for r in rows) + sum(r["n_ref"] for r in rows))


def test_generator_truth_is_what_it_says():
    img, truth = nuclei_field(40, 24, 0.6, size=256, seed=3)
    assert img.shape == truth.shape == (256, 256) and img.dtype == np.float32
    assert truth.max() == 40 and len(np.unique(truth)) == 41
    # each nucleus one connected piece with an equivalent diameter near 24 px
    areas = np.bincount(truth.ravel())[1:]
    assert np.median(2 * np.sqrt(areas / np.pi)) == pytest.approx(24, rel=0.15)
    assert all(ndi.label(truth == k)[1] == 1 for k in range(1, 41))
    # more placed against a neighbour, more touching; nuclei brighter than the background
    sparse = touching_fraction(nuclei_field(40, 24, 0.1, size=256, seed=3)[1])
    assert touching_fraction(truth) > sparse + 0.2
    assert np.median(img[truth > 0]) > 2 * np.median(img[truth == 0])
    # a field that cannot hold the nuclei gets fewer (at most 55 % covered)
    _, full = nuclei_field(300, 40, 0.6, size=256, seed=3)
    assert coverage(int(full.max()), 40, 256) <= 0.55
    # by hand: two labels sharing a border touch, a third alone does not
    lab = np.zeros((10, 20), np.int32)
    lab[2:5, 2:5], lab[2:5, 5:8], lab[2:5, 14:17] = 1, 2, 3
    assert touching_fraction(lab) == pytest.approx(2 / 3)


# (nuclei per 512², diameter px) for every density bin of the bench; 60 % placed touching
BINS = [(10, 24), (30, 16), (100, 24), (300, 16)]


@pytest.mark.parametrize(("per_512", "diameter"), BINS)
def test_f1_per_density_bin(per_512, diameter):
    """Pooled over a few 256² fields at the density of the bin, most nuclei touching."""
    n = max(3, per_512 // 4)  # a quarter of the nuclei on a quarter of the area
    rows, est = [], []
    for seed in range(max(2, 40 // n)):
        img, truth = nuclei_field(n, diameter, 0.6, size=256, seed=100 * per_512 + seed)
        rows.append(object_f1(segment_nuclei(img, exclude_border=False), truth))
        est.append(estimate_nucleus_diameter(img))
    f1 = _pooled_f1(rows)
    print(f"{per_512}/512² d={diameter}: F1 {f1:.3f}, D estimated {np.median(est):.1f}")
    assert f1 >= 0.85, rows  # the bench's grid: >= 0.90 per bin, pooled over sizes
    assert np.median(est) == pytest.approx(diameter, rel=0.2)


def test_dense_small_touching_nuclei_issue_21():
    """About 125 nuclei of 24 px on 512², most touching: the diameter is read as one nucleus's
    (0.3.0 read 31 px on the issue's real image, F1 0.59; on these fields D 26.8, F1 0.845)."""
    rows, fixed = [], []
    for seed in (2100, 2101):
        img, truth = nuclei_field(125, 24, 0.6, size=512, seed=seed)
        assert touching_fraction(truth) > 0.6
        est = estimate_nucleus_diameter(img)
        assert est == pytest.approx(24, rel=0.12), est
        rows.append(object_f1(segment_nuclei(img, exclude_border=False), truth))
        fixed.append(object_f1(segment_nuclei(img, method="fixed", exclude_border=False), truth))
    f1 = _pooled_f1(rows)
    print(f"issue 21 case: F1 {f1:.3f} (0.2's fixed {_pooled_f1(fixed):.3f})")
    assert f1 >= 0.88, rows  # the bench's five fields: see docs/validation.md
    # the 0.2 default, for the record of what these fields ask: its fixed settings do worse
    assert f1 > _pooled_f1(fixed), (rows, fixed)
