"""Benchmark nuclei (and cell) segmentation against hand segmentations and CellProfiler's masks.

Datasets (../shared/data): Coelho 2009 `gnf` (U2OS, large textured nuclei) and `ic100` (NIH 3T3,
bright uneven background), ten hand-segmented images each, pooled; the five NF1 sites against
CellProfiler's nuclei masks (per site); the pediatric Cell Painting site against CellProfiler's
nuclei outlines (a cell line none of the defaults were chosen on). Methods, in one run, each with its own default settings:
- `adaptive`: `segment_nuclei(dna)` (the current default: scale estimated from each image),
- `fixed`: `segment_nuclei(dna, method="fixed")` (the 0.2 default: Otsu, fixed pixel settings),
- `otsu_cc`: the plain peer, Otsu on a 2 px Gaussian, holes filled, connected components.
Object F1 at IoU 0.5 (`object_f1`, labels counted as unique values), precision, recall and seconds
per megapixel. Coelho protocols: `all` = every hand-segmented nucleus, methods run with
`exclude_border=False` (as the numbers in ../shared/data/README.md); `interior` = the default
`exclude_border=True` against the hand nuclei that do not touch the edge. NF1 uses the default
(CellProfiler drops edge nuclei too). A last table scores NF1 cells (propagation on RFP) against
CellProfiler's MaskCells, whose touching cells are merged in the binary mask: each CellProfiler
nucleus with a cell takes the cell-mask pixels nearest to it, and cells touching the image edge
are left out on both sides (CellProfiler's mask has none).

A synthetic grid (`celldino.synth.nuclei`, ground truth known) from sparse to confluent: 10, 30,
100 and 300 nuclei per 512² field, typical diameters 10, 16, 24, 40 and 80 px, a low and a high
share of touching nuclei (10 % or 60 % placed against a neighbour; the share that actually touch is
printed), cells whose discs would cover more than 60 % of the field left out (300 nuclei of 40 px
cannot be drawn); ceil(60 / n) fields per cell, `exclude_border=False` against every true nucleus.
A table per cell and one per density bin (all sizes and touching shares pooled), and the case of
issue 21 (about 125 nuclei of 24 px, most touching) with the estimated diameter.

    .venv/bin/python bench/bench_segmentation.py            # real sets, then the synthetic grid
    .venv/bin/python bench/bench_segmentation.py --synthetic  # the grid only
    .venv/bin/python bench/bench_segmentation.py --real       # the real sets only
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from skimage import filters, segmentation

from celldino.data.segmentation import (
    estimate_nucleus_diameter,
    expand_nuclei,
    labels_from_mask,
    object_f1,
    segment_cells,
    segment_nuclei,
)
from celldino.io.images import read_image
from celldino.synth.nuclei import coverage, nuclei_field, touching_fraction

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
COELHO = DATA / "nuclei_coelho2009"
NF1 = DATA / "cellpainting_fovs" / "NF1_cellpainting_data_shrunken"
NF1_SITES = ["B7_01_1_3", "D6_01_1_2", "D7_01_1_1", "F7_01_1_2", "H12_01_1_1"]
PED = DATA / "cellpainting_fovs" / "pediatric_cancer_atlas_profiling" / "images"


def otsu_cc(dna: np.ndarray, exclude_border: bool = True) -> np.ndarray:
    """The plain peer: Otsu on a 2 px Gaussian, holes filled, connected components."""
    img = filters.gaussian(dna.astype(np.float32), sigma=2.0, preserve_range=True)
    lab, _ = ndi.label(ndi.binary_fill_holes(img > filters.threshold_otsu(img)))
    return segmentation.clear_border(lab) if exclude_border else lab


METHODS = {
    "adaptive": lambda d, eb: segment_nuclei(d, exclude_border=eb),
    "fixed": lambda d, eb: segment_nuclei(d, method="fixed", exclude_border=eb),
    "otsu_cc": lambda d, eb: otsu_cc(d, eb),
}


def coelho(name: str):
    for i in range(10, 20):
        dna = np.asarray(Image.open(COELHO / name / f"dna-{i}.png"))[..., 0]
        ref = np.asarray(Image.open(COELHO / name / f"label-{i}.png"))
        yield f"{name}/{i}", dna, ref


def nf1():
    for s in NF1_SITES:
        dna = read_image(NF1 / "Plate_2_images" / f"{s}_DAPI_001.tif")
        ref = labels_from_mask(read_image(NF1 / "Plate_2_masks" / f"{s}_DAPI_001_MaskNuclei.tiff"))
        yield s, dna, ref


def pediatric():
    """The pediatric site's DNA (ch5) and CellProfiler's nuclei, rebuilt from its outline overlay:
    the insides of the outlines labelled, then grown back over the 1-2 px outline."""
    import tifffile

    outline = tifffile.imread(PED / "outlines" / "NucleiOutlines_BR00143976_C03_3.tiff")[..., 1] > 0
    filled = ndi.binary_fill_holes(outline)
    inner, _ = ndi.label(filled & ~outline)
    ref = segmentation.expand_labels(inner, 2) * filled
    yield "r03c03f03", read_image(PED / "orig" / "r03c03f03p01-ch5sk1fk1fl1.tiff"), ref


def pooled(rows: list[dict]) -> dict:
    tp = sum(r["tp"] for r in rows)
    n_pred, n_ref = sum(r["n_pred"] for r in rows), sum(r["n_ref"] for r in rows)
    p, r = tp / max(n_pred, 1), tp / max(n_ref, 1)
    return {"f1": 2 * p * r / (p + r) if p + r else 0.0, "precision": p, "recall": r,
            "n_pred": n_pred, "n_ref": n_ref}  # fmt: skip


def score(images, method: str, exclude_border: bool, interior_ref: bool):
    rows, secs, mpix = [], 0.0, 0.0
    for name, dna, ref in images:
        t = time.perf_counter()
        pred = METHODS[method](dna, exclude_border)
        secs += time.perf_counter() - t
        mpix += dna.size / 1e6
        ref = segmentation.clear_border(ref) if interior_ref else ref
        rows.append((name, object_f1(pred, ref)))
    return rows, secs / mpix


def nf1_cells() -> list[tuple[str, dict]]:
    out = []
    for s in NF1_SITES:
        cell_site = s.replace("_1_", "_3_", 1)
        dna = read_image(NF1 / "Plate_2_images" / f"{s}_DAPI_001.tif")
        rfp = read_image(NF1 / "Plate_2_images" / f"{cell_site}_RFP_001.tif")
        mask = read_image(NF1 / "Plate_2_masks" / f"{cell_site}_RFP_001_MaskCells.tiff") > 0
        nuc = labels_from_mask(read_image(NF1 / "Plate_2_masks" / f"{s}_DAPI_001_MaskNuclei.tiff"))
        ids = np.unique(nuc[nuc > 0])
        keep = [i for i in ids if mask[nuc == i].mean() > 0.5]  # CP nuclei that have a CP cell
        ref = segmentation.expand_labels(np.where(np.isin(nuc, keep), nuc, 0), 10**6) * mask
        ours = segment_nuclei(dna)
        for kind, cells in (
            ("propagation", segment_cells(rfp, ours)),
            ("watershed (0.2)", segment_cells(rfp, ours, method="watershed", smooth_sigma=2.0,
                                              max_expand=100)),
            ("expand nuclei D/2", expand_nuclei(ours)),
        ):  # fmt: skip
            out.append((f"{kind} {s}", object_f1(segmentation.clear_border(cells), ref)))
    return out


DENSITIES = (10, 30, 100, 300)  # nuclei per 512² field
DIAMETERS = (10, 16, 24, 40, 80)  # px
TOUCHING = (0.1, 0.6)  # share of the nuclei placed against a neighbour
MAX_COVERAGE = 0.6


def synthetic_cells():
    """(n, diameter, touching, seeds) of the grid; cells that cannot be drawn are left out."""
    for n in DENSITIES:
        for d in DIAMETERS:
            if coverage(n, d) > MAX_COVERAGE:
                continue
            for t in TOUCHING:
                seeds = [10_000 * n + 100 * d + int(10 * t) + k for k in range(-(-60 // n))]
                yield n, d, t, seeds


def synthetic(methods=("adaptive", "fixed")) -> None:
    cells, bins = [], {}
    for n, d, t, seeds in synthetic_cells():
        rows = {m: [] for m in methods}
        touch, est = [], []
        for seed in seeds:
            img, truth = nuclei_field(n, d, t, seed=seed)
            touch.append(touching_fraction(truth))
            est.append(estimate_nucleus_diameter(img))
            for m in methods:
                rows[m].append(object_f1(METHODS[m](img, False), truth))
        cells.append((n, d, t, float(np.mean(touch)), float(np.median(est)), rows))
        for m in methods:
            bins.setdefault((n, m), []).extend(rows[m])
    print("\nSynthetic grid per cell (object F1 at IoU 0.5; all fields of a cell pooled)")
    head = " | ".join(f"{m} F1 (P / R)" for m in methods)
    print(f"| nuclei / 512² | diameter | touching (placed → touching) | D estimated | {head} | "
          "nuclei (pred / true) |")  # fmt: skip
    print("|---|---|---|---|" + "---|" * len(methods) + "---|")
    for n, d, t, touch, est, rows in cells:
        cols = []
        for m in methods:
            pr = pooled(rows[m])
            cols.append(f"{pr['f1']:.3f} ({pr['precision']:.3f} / {pr['recall']:.3f})")
        pr = pooled(rows[methods[0]])
        print(f"| {n} | {d} | {t:.1f} → {touch:.2f} | {est:.1f} | {' | '.join(cols)} | "
              f"{pr['n_pred']} / {pr['n_ref']} |")  # fmt: skip
    print("\nSynthetic grid per density bin (every size and touching share pooled)")
    print("| nuclei / 512² | method | F1 | precision | recall | nuclei (pred / true) |")
    print("|---|---|---|---|---|---|")
    for n in DENSITIES:
        for m in methods:
            pr = pooled(bins[(n, m)])
            print(f"| {n} | {m} | {pr['f1']:.3f} | {pr['precision']:.3f} | {pr['recall']:.3f} | "
                  f"{pr['n_pred']} / {pr['n_ref']} |")  # fmt: skip
    print("\nIssue 21's case: 125 nuclei of 24 px per 512², 60 % placed touching (5 fields)")
    print("| method | F1 | precision | recall | nuclei (pred / true) | D estimated (median) |")
    print("|---|---|---|---|---|---|")
    fields = [nuclei_field(125, 24, 0.6, seed=2100 + k) for k in range(5)]
    est = float(np.median([estimate_nucleus_diameter(img) for img, _ in fields]))
    for m in methods:
        pr = pooled([object_f1(METHODS[m](img, False), truth) for img, truth in fields])
        print(f"| {m} | {pr['f1']:.3f} | {pr['precision']:.3f} | {pr['recall']:.3f} | "
              f"{pr['n_pred']} / {pr['n_ref']} | {est:.1f} |")  # fmt: skip


def main() -> int:
    args = set(sys.argv[1:])
    if args - {"--synthetic", "--real"}:
        print(f"unknown arguments {sorted(args)}: use --synthetic or --real", file=sys.stderr)
        return 2
    if "--synthetic" in args:
        synthetic()
        return 0
    if not COELHO.exists() or not NF1.exists():
        print(f"real data missing under {DATA}", file=sys.stderr)
        return 1
    print("| dataset | protocol | method | F1 | precision | recall | objects (pred/ref) | s/MP |")
    print("|---|---|---|---|---|---|---|---|")
    nf1_sites = {}
    sets = {"NF1": nf1, "pediatric": pediatric}
    for ds in ("gnf", "ic100", "NF1", "pediatric"):
        protocols = [("default", True, False)] if ds in sets else [
            ("all", False, False), ("interior", True, True)]  # fmt: skip
        for proto, eb, interior in protocols:
            base = None
            for m in METHODS:
                images = sets[ds]() if ds in sets else coelho(ds)
                rows, spm = score(images, m, eb, interior)
                pr = pooled([r for _, r in rows])
                base = base or pr["f1"]
                if ds == "NF1":
                    nf1_sites[m] = rows
                print(f"| {ds} | {proto} | {m} | {pr['f1']:.3f} | {pr['precision']:.3f} | "
                      f"{pr['recall']:.3f} | {pr['n_pred']}/{pr['n_ref']} | {spm:.2f} |")  # fmt: skip
    print("\nNF1 per site (F1; CellProfiler's nuclei)")
    print("| site | " + " | ".join(METHODS) + " |")
    print("|---|" + "---|" * len(METHODS))
    for k, s in enumerate(NF1_SITES):
        cells = " | ".join(f"{nf1_sites[m][k][1]['f1']:.3f}" for m in METHODS)
        print(f"| {s} | {cells} |")
    print("\nNF1 cells vs CellProfiler's MaskCells (split by CP nuclei; edge cells left out)")
    print("| cells | site | F1 | precision | recall | cells (pred/ref) |")
    print("|---|---|---|---|---|---|")
    rows = nf1_cells()
    for name, r in rows:
        kind, site = name.rsplit(" ", 1)
        print(f"| {kind} | {site} | {r['f1']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} | "
              f"{r['n_pred']}/{r['n_ref']} |")  # fmt: skip
    for kind in ("propagation", "watershed (0.2)", "expand nuclei D/2"):
        pr = pooled([r for n, r in rows if n.startswith(kind + " ")])
        print(f"| {kind} | pooled | {pr['f1']:.3f} | {pr['precision']:.3f} | "
              f"{pr['recall']:.3f} | {pr['n_pred']}/{pr['n_ref']} |")  # fmt: skip
    if "--real" not in args:
        synthetic()
    return 0


if __name__ == "__main__":
    sys.exit(main())
