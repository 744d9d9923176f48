"""Check prepare's illumination, QC and user masks against truth; prints the numbers of
docs/validation.md ("Illumination, QC and masks against truth").

1. Illumination: each plate's function against the synthetic screen's planted vignetting
   (`tiny` and `demo` presets), worst pixel and RMS relative error per plate (worst channel),
   for celldino and, in the same run, the peer: CellProfiler's CorrectIlluminationCalculate as
   celldino did it before (mean of the plate's images, median filter of 1/20 of the side,
   divided by its 2nd percentile, clipped at 1), given the same QC-passing images.
2. The same on NF1's five already-corrected sites: the function's range per channel, fitted
   (prepare.illum_min_images=3) and with the default (10: not corrected).
3. QC: precision and recall of the planted blur and debris images on both presets, and the flags
   on the 7 real sites of ../shared/data/cellpainting_fovs (each data set as one screen).
4. NF1 through `prepare` with CellProfiler's binary MaskCells: cells per site against
   CellProfiler's nuclei.

    .venv/bin/python bench/validate_prepare_truth.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "cellpainting_fovs"
sys.path.insert(0, str(ROOT / "tests"))


def peer_function(images: list[np.ndarray]) -> np.ndarray:
    """CellProfiler-style: mean image, median filter 1/20 of the side, / 2nd percentile, >= 1."""
    mean = np.mean([im.astype(np.float64) for im in images], axis=0)
    out = np.empty(mean.shape, np.float32)
    for c, plane in enumerate(mean):
        smooth = ndi.median_filter(plane, size=max(3, min(plane.shape) // 20), mode="reflect")
        out[c] = np.maximum(smooth / np.percentile(smooth, 2), 1.0)
    return out


def illumination(screen: Path) -> list[dict]:
    from celldino.data.illumination import IlluminationAccumulator
    from celldino.data.imagesets import ImageSet
    from celldino.io.tables import read_load_data

    df, chans = read_load_data(screen / "load_data.csv")
    iset = ImageSet(df, chans)
    acc = IlluminationAccumulator()
    images: dict[str, list] = {}
    for i in range(len(iset)):
        plate = str(iset.table.at[i, "Metadata_Plate"])
        img = iset.read(i)
        acc.add(plate, img, key=iset.key(i))
        if iset.table.at[i, "Metadata_QC_Truth"] == "ok":
            images.setdefault(plate, []).append(img)
    passing = set(iset.table.loc[iset.table.Metadata_QC_Truth == "ok", "Metadata_ImageKey"])
    fns, report = acc.functions(passing=passing)
    truth = pd.read_parquet(screen / "truth_images.parquet").groupby("Metadata_Plate").first()
    rows = []
    for plate, fn in fns.items():
        t = truth.loc[plate]
        h, w = fn.shape[1:]
        yy, xx = np.mgrid[0:h, 0:w]
        r2 = ((xx - t.vignette_x) ** 2 + (yy - t.vignette_y) ** 2) / (0.5 * (h**2 + w**2))
        vig = 1 - t.vignette * r2
        want = vig / vig.min()
        row = {"plate": plate, "images": report[plate]["n_images"], "true": want.max()}
        for who, f in (("celldino", fn), ("peer", peer_function(images[plate]))):
            rel = f / want[None] - 1
            row[f"{who}_range"] = f"{f.reshape(len(f), -1).max(1).min():.2f}-"
            row[f"{who}_range"] += f"{f.reshape(len(f), -1).max(1).max():.2f}"
            row[f"{who}_worst"] = float(np.abs(rel).max())
            row[f"{who}_rms"] = float(np.sqrt((rel**2).mean(axis=(1, 2))).max())
        rows.append(row)
    return rows


def nf1_ranges(tmp: Path) -> dict:
    from celldino.config import PrepareConfig
    from celldino.data.prepare import prepare

    root = SHARED / "NF1_cellpainting_data_shrunken"
    out = {}
    for n in (3, 10):
        cfg = PrepareConfig(
            image_dir=str(root / "Plate_2_images"),
            pattern="nf1",
            channel_map={"DAPI": "DNA", "GFP": "GFP", "RFP": "RFP"},
            segmentation="masks",
            mask_dir=str(root / "Plate_2_masks"),
            nuclei_masks="{stem_DNA}_MaskNuclei.tiff",
            cell_masks="{stem_RFP}_MaskCells.tiff",
            out_dir=str(tmp / f"nf1_{n}"),
            features=False,
            crop_size=32,
            illum_min_images=n,
        )
        prep = prepare(cfg)
        (rep,) = json.loads((prep / "prepare.json").read_text())["illumination_report"].values()
        out[n] = [(ch["range"], ch["status"]) for ch in rep["channels"]]
        if n == 10:
            cells = pd.read_parquet(prep / "cells.parquet")
            out["cells"] = cells.groupby("Metadata_Well").size().to_dict()
            from celldino.data.user_masks import labels_from_mask
            from celldino.io.images import read_image

            out["cp_nuclei"] = {
                f.name.split("_")[0]: int(labels_from_mask(read_image(f)).max())
                for f in sorted((root / "Plate_2_masks").glob("*MaskNuclei.tiff"))
            }
            out["blobs"] = {
                f.name.split("_")[0]: int(ndi.label(read_image(f) > 0)[1])
                for f in sorted((root / "Plate_2_masks").glob("*MaskCells.tiff"))
            }
    return out


def qc_scores(screen: Path) -> dict:
    from test_qc import _screen_qc

    flagged, truth = _screen_qc(screen)
    out = {}
    for kind in ("blur", "debris"):
        pred = flagged[f"QC_Flag_{kind}"].to_numpy()
        t = truth == kind
        tp = int((pred & t).sum())
        out[kind] = (round(tp / max(int(pred.sum()), 1), 3), round(tp / max(int(t.sum()), 1), 3))
    out["other flags"] = int((~flagged.QC_Pass & (truth == "ok")).sum())
    return out


def main() -> None:
    from celldino.config import SynthConfig
    from celldino.data import qc
    from celldino.synth import make_screen
    from test_qc import _real_sites

    tmp = Path(tempfile.mkdtemp(prefix="validate_prepare_"))
    screens = {p: make_screen(tmp / p, SynthConfig(preset=p, seed=0)) for p in ("tiny", "demo")}
    print("1. illumination vs planted vignetting (relative error, worst channel)")
    print("preset plate images true | celldino range worst rms | peer range worst rms")
    for preset, screen in screens.items():
        for r in illumination(screen):
            print(
                f"{preset:6} {r['plate']} {r['images']:3d} {r['true']:.3f} | "
                f"{r['celldino_range']} {r['celldino_worst']:.3f} {r['celldino_rms']:.3f} | "
                f"{r['peer_range']} {r['peer_worst']:.3f} {r['peer_rms']:.3f}"
            )
    nf1 = nf1_ranges(tmp)
    print("\n2. NF1 (already corrected) flat-field range per channel DAPI, GFP, RFP")
    print(f"fitted (illum_min_images=3): {nf1[3]}")
    print(f"default (illum_min_images=10): {nf1[10]}")
    print("\n3. QC: precision, recall (planted) per kind; good images flagged")
    for preset, screen in screens.items():
        print(preset, qc_scores(screen))
    for name, sites in _real_sites(SHARED).items():
        items = [s if isinstance(s, tuple) else (s, 0) for s in sites]
        f = qc.flag_images(pd.DataFrame([qc.image_metrics(img, d) for img, d in items]))
        print(f"real {name}: {len(f)} sites, flagged {int((~f.QC_Pass).sum())}")
    print("\n4. NF1 binary MaskCells through prepare: well: blobs, CellProfiler nuclei, cells")
    for well, n in nf1["cells"].items():
        print(f"{well}: {nf1['blobs'][well]} blobs, {nf1['cp_nuclei'][well]} nuclei, {n} cells")


if __name__ == "__main__":
    main()
