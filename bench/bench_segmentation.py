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

    .venv/bin/python bench/bench_segmentation.py
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
    expand_nuclei,
    labels_from_mask,
    object_f1,
    segment_cells,
    segment_nuclei,
)
from celldino.io.images import read_image

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


def main() -> int:
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
