"""celldino's engineered features (cp_measure) against CellProfiler's own values, cell by cell.

The reference: `../shared/data/cellpainting_fovs/*/*_shrunken.parquet`, CellProfiler's
measurements of 5 cells per dataset, with `Nuclei_Location_Center_X/Y`. We measure the same
images with `celldino.data.engineered.cell_features`, match each reference cell to our nucleus
nearest its centre, and compare every feature present in both tables, per object and family.

- NF1 (5 sites, DAPI/GFP/RFP, illumination-corrected images): CellProfiler's own masks
  (`Plate_2_masks/`): nuclei are the mask's connected components; cells are the binary cell mask
  split among the nuclei by CellProfiler's own propagation (centrosome.propagate, on the RFP
  image): touching cells are one blob in a binary mask, so cell outlines are close, not exact.
  The images given are not exactly those CellProfiler measured (its intensities are lower by a
  near-constant ~0.048 of full scale), so offset-free features (Std, shape) agree best.
- JUMP (CPJUMP1, 3 channels) and pediatric (6 channels): celldino's own segmentation of the
  raw (`orig`) images, while CellProfiler measured its illumination-corrected images with its own
  objects: a looser check (same cell, other outlines and intensities).

Per family: features compared, cell-feature pairs, Pearson and Spearman over the pairs (each
feature standardised by CellProfiler's values across the pooled cells, so families mixing scales
are not trivially correlated), median |relative error| and the share of pairs within 1 %.

    .venv/bin/python bench/validate_cp_measure.py            # all three datasets (~3 min)
    .venv/bin/python bench/validate_cp_measure.py --nf1-only
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
from centrosome.propagate import propagate
from scipy import ndimage as ndi
from scipy.stats import pearsonr, spearmanr

from celldino.data.engineered import FAMILIES, cell_features
from celldino.data.segmentation import segment_cells, segment_nuclei

ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cellpainting_fovs"
NF1 = ROOT / "NF1_cellpainting_data_shrunken"
OBJECTS = ("Nuclei", "Cells", "Cytoplasm")


def nf1_site(well: str, site: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(image (3, H, W) uint16, nuclei, cells) of one NF1 site from CellProfiler's masks."""
    chans = ["DAPI", "GFP", "RFP"]
    img = np.stack(
        [
            tifffile.imread(next((NF1 / "Plate_2_images").glob(f"{well}_01_*_{site}_{c}_001.tif")))
            for c in chans
        ]
    )
    masks = NF1 / "Plate_2_masks"
    nm = tifffile.imread(next(masks.glob(f"{well}_01_1_{site}_DAPI_001_MaskNuclei.tiff"))) > 0
    cm = tifffile.imread(next(masks.glob(f"{well}_01_3_{site}_RFP_001_MaskCells.tiff"))) > 0
    nuclei, _ = ndi.label(nm)
    # CellProfiler's IdentifySecondaryObjects (Propagation, regularisation 0.05) in its own code
    cells, _ = propagate(img[2] / 65535.0, nuclei, cm | nm, 0.05)
    return img, nuclei.astype(np.int32), cells.astype(np.int32), chans


def _nearest(labels: np.ndarray, x: float, y: float) -> int:
    ids = np.unique(labels[labels > 0])
    cy, cx = np.asarray(ndi.center_of_mass(np.ones_like(labels), labels, ids)).T
    k = int(np.argmin((cx - x) ** 2 + (cy - y) ** 2))
    d = float(np.hypot(cx[k] - x, cy[k] - y))
    return int(ids[k]) if d < 10 else -1


def measure(img, nuclei, cells, chans, refs: pd.DataFrame) -> pd.DataFrame:
    """Our features for the reference cells (rows aligned with refs; NaN where unmatched)."""
    ids = [
        _nearest(nuclei, r.Nuclei_Location_Center_X, r.Nuclei_Location_Center_Y)
        for r in refs.itertuples()
    ]
    keep = [i for i in ids if i > 0]
    lut = np.zeros(nuclei.max() + 1, np.int32)
    lut[keep] = keep  # only the matched cells: the others do not change these measurements
    df = cell_features(img, lut[nuclei], lut[cells], chans, cell_ids=keep, families=FAMILIES)
    df.index = keep
    return df.reindex(ids).reset_index(drop=True)


def family(col: str) -> str:
    return col.split("_")[1]


def compare(ours: pd.DataFrame, ref: pd.DataFrame, rename=lambda c: c) -> pd.DataFrame:
    """One row per (object, family): agreement over the cells and shared features."""
    rows = []
    pairs = {}
    for c in ours.columns:
        rc = rename(c)
        if rc not in ref.columns and c.split("_")[1] == "Correlation":
            p = rc.split(
                "_"
            )  # Correlation_Correlation_A_B is symmetric: CellProfiler may write B_A
            alt = "_".join(p[:3] + [p[4], p[3]]) if len(p) == 5 and p[2] == "Correlation" else rc
            rc = alt
        if rc in ref.columns:
            pairs[c] = rc
    for obj in OBJECTS:
        for fam in FAMILIES:
            cols = [c for c in pairs if c.startswith(f"{obj}_{fam}_")]
            if not cols:
                continue
            a = ours[cols].to_numpy(float)
            b = ref[[pairs[c] for c in cols]].to_numpy(float)
            ok = np.isfinite(a) & np.isfinite(b)
            sd = np.nanstd(np.where(ok, b, np.nan), axis=0)
            mu = np.nanmean(np.where(ok, b, np.nan), axis=0)
            sd[~(sd > 0)] = np.nan
            za, zb = ((a - mu) / sd), ((b - mu) / sd)
            zok = ok & np.isfinite(za) & np.isfinite(zb)
            rel = np.abs(a - b) / np.maximum(np.abs(b), 1e-12)
            rows.append(
                {
                    "object": obj,
                    "family": fam,
                    "features": len(cols),
                    "pairs": int(ok.sum()),
                    "pearson": pearsonr(za[zok], zb[zok])[0] if zok.sum() > 2 else np.nan,
                    "spearman": spearmanr(a[ok], b[ok])[0] if ok.sum() > 2 else np.nan,
                    "median_rel_err": float(np.median(rel[ok])) if ok.any() else np.nan,
                    "within_1pct": float((rel[ok] < 0.01).mean()) if ok.any() else np.nan,
                }
            )
    return pd.DataFrame(rows)


def per_feature(ours: pd.DataFrame) -> pd.DataFrame:
    """NF1: per feature, the median |relative error| over the 5 cells and Spearman across them."""
    ref = pd.read_parquet(NF1 / "Plate_2_with_image_data_shrunken.parquet").reset_index(drop=True)
    rows = []
    for c in ours.columns:
        if c not in ref.columns:
            continue
        a, b = ours[c].to_numpy(float), ref[c].to_numpy(float)
        ok = np.isfinite(a) & np.isfinite(b)
        if not ok.any():
            continue
        rel = np.abs(a[ok] - b[ok]) / np.maximum(np.abs(b[ok]), 1e-12)
        rho = spearmanr(a[ok], b[ok])[0] if ok.sum() > 2 else np.nan
        rows.append({"feature": c, "median_rel_err": float(np.median(rel)), "spearman": rho})
    return pd.DataFrame(rows)


def run_nf1() -> tuple[pd.DataFrame, pd.DataFrame]:
    ref = pd.read_parquet(NF1 / "Plate_2_with_image_data_shrunken.parquet").reset_index(drop=True)
    ours = []
    for i, r in ref.iterrows():
        img, nuclei, cells, chans = nf1_site(r.Image_Metadata_Well_x, int(r.Image_Metadata_Site_x))
        ours.append(measure(img, nuclei, cells, chans, ref.iloc[[i]]))
    ours = pd.concat(ours, ignore_index=True)
    return compare(ours, ref), ours


def run_phenix(name: str, table: str, chans: dict[str, str], cell_channel: str, prefix: str = ""):
    folder = ROOT / name
    ref = pd.read_parquet(folder / table).reset_index(drop=True)
    files = sorted((folder / "images" / "orig").glob("*.tiff"))
    planes = {}
    for f in files:
        ch = f.name.split("-ch")[1].split("sk")[0]
        if ch in chans:
            planes[chans[ch]] = tifffile.imread(f)
    names = sorted(planes)
    img = np.stack([planes[n] for n in names])
    nuclei = segment_nuclei(planes["DNA"])
    cells = segment_cells(planes[cell_channel], nuclei)
    ours = measure(img, nuclei, cells, names, ref)
    rename = (lambda c: c) if not prefix else (lambda c: _prefix_channels(c, names, prefix))
    return compare(ours, ref, rename), ours


def _prefix_channels(col: str, names: list[str], prefix: str) -> str:
    parts = col.split("_")
    return "_".join(prefix + p if p in names else p for p in parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nf1-only", action="store_true")
    ap.add_argument("--out", default="", help="also write the table as CSV here")
    ap.add_argument("--per-feature", default="", help="write NF1's per-feature errors (CSV) here")
    args = ap.parse_args(argv)
    if not ROOT.exists():
        print(f"missing {ROOT}", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    nf1, ours = run_nf1()
    tables = {"NF1 (CellProfiler masks)": nf1}
    if args.per_feature:
        per_feature(ours).to_csv(args.per_feature, index=False)
    if not args.nf1_only:
        tables["JUMP (celldino segmentation, raw images)"] = run_phenix(
            "JUMP_plate_BR00117006",
            "BR00117006_shrunken.parquet",
            {"5": "DNA", "2": "AGP", "3": "RNA"},
            "AGP",
        )[0]
        tables["pediatric (celldino segmentation, raw images)"] = run_phenix(
            "pediatric_cancer_atlas_profiling",
            "BR00143976_shrunken.parquet",
            {"2": "ER", "3": "AGP", "4": "Mito", "5": "DNA", "6": "RNA"},
            "AGP",
            prefix="Corr",
        )[0]
    out = []
    for name, t in tables.items():
        t.insert(0, "dataset", name)
        out.append(t)
    table = pd.concat(out, ignore_index=True)
    pd.set_option("display.width", 200)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"\n{time.perf_counter() - t0:.0f} s")
    if args.out:
        table.to_csv(args.out, index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
