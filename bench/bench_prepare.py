"""Benchmark `prepare`: cells per second from multi-channel TIFFs to crops in the store.

Measures segmentation + cropping + writing (features off, illumination on) and the peak traced
memory (tracemalloc: Python + NumPy buffers) of each run, in its own process, on the real pediatric Cell Painting site (6 channels,
1080x1080) and on a synthetic screen with 1080x1080 fields. Peer, measured in the same run: a
plain script (tifffile + skimage Otsu/label + numpy crops, one .npy file per cell, DeepProfiler-
export style) on the same images.

A second table: cells/s with CellProfiler's measurements (cp_measure) off and on, per
`prepare.feature_families` set, on the pediatric site and on one plate of the `demo` screen, beside
the same plain-script peer (which measures nothing). `--features-only` runs just that table.

    .venv/bin/python bench/bench_prepare.py [--features-only]
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "cellpainting_fovs"
PED_MAP = {"5": "DNA", "2": "ER", "6": "RNA", "3": "AGP", "4": "Mito", "1": "Brightfield"}


def _celldino(kind: str, src: str, out: str, q, families: str = "") -> None:
    """`families` empty: features off; else prepare.feature_families (a set or a family)."""
    from celldino.config import PrepareConfig
    from celldino.data.prepare import prepare

    feats = {"features": bool(families), "feature_families": (families or "all",)}
    if kind == "ped":
        cfg = PrepareConfig(
            image_dir=src,
            pattern="opera_phenix",
            channel_map=PED_MAP,
            plate="BR00143976",
            out_dir=out,
            **feats,
        )
    else:
        cfg = PrepareConfig(load_data=src, out_dir=out, qc_exclude=False, **feats)
        if kind == "demo":  # the demo's own prepare settings (configs/demo.yaml)
            cfg = dataclasses.replace(
                cfg,
                crop_size=40,
                normalization="percentile_plate",
                nuclei_min_area=30,
                cell_expand=10,
            )
    tracemalloc.start()
    t = time.perf_counter()
    prepare(cfg)
    dt = time.perf_counter() - t
    import pandas as pd

    n = len(pd.read_parquet(Path(out) / "cells.parquet"))
    q.put((n, dt, tracemalloc.get_traced_memory()[1] / 2**20))


def _peer(kind: str, src: str, out: str, q) -> None:
    import pandas as pd
    import tifffile
    from scipy import ndimage as ndi
    from skimage import filters, measure

    from celldino.io.tables import load_data_from_folder, read_load_data

    if kind == "ped":
        df, chans = load_data_from_folder(src, "opera_phenix", PED_MAP)
    else:
        df, chans = read_load_data(src)
    tracemalloc.start()
    t = time.perf_counter()
    n = 0
    Path(out).mkdir(parents=True, exist_ok=True)
    for _, row in df.iterrows():
        img = np.stack(
            [tifffile.imread(Path(row[f"PathName_{c}"]) / row[f"FileName_{c}"]) for c in chans]
        )
        dna = filters.gaussian(img[chans.index("DNA")].astype(np.float32), 2, preserve_range=True)
        lab = measure.label(ndi.binary_fill_holes(dna > filters.threshold_otsu(dna)))
        pad = np.pad(img, ((0, 0), (48, 48), (48, 48)))
        for p in measure.regionprops(lab):
            if p.area < 50:
                continue
            y, x = (int(v) for v in p.centroid)
            np.save(Path(out) / f"cell_{n:06d}.npy", pad[:, y : y + 96, x : x + 96])
            n += 1
    dt = time.perf_counter() - t
    q.put((n, dt, tracemalloc.get_traced_memory()[1] / 2**20))
    _ = pd


def _measure(fn, *args, **kwargs):
    q = mp.get_context("spawn").Queue()
    p = mp.get_context("spawn").Process(target=fn, args=(*args, q), kwargs=kwargs)
    p.start()
    res = q.get()
    p.join()
    return res


def main() -> None:
    from celldino.config import SynthConfig
    from celldino.synth import make_screen

    tmp = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    cases = []
    if SHARED.exists():
        cases.append(
            (
                "pediatric site (6 ch, 1080²)",
                "ped",
                str(SHARED / "pediatric_cancer_atlas_profiling" / "images" / "orig"),
            )
        )
    if "--features-only" in sys.argv:
        features_table(tmp, cases[0] if cases else None)
        shutil.rmtree(tmp, ignore_errors=True)
        return
    t = time.perf_counter()
    screen = make_screen(
        tmp / "synth",
        SynthConfig(
            preset="custom",
            n_plates=1,
            n_batches=1,
            image_size=1080,
            cells_per_site=150,
            sites_per_well=1,
        ),
    )
    print(f"synthetic screen made in {time.perf_counter() - t:.1f} s")
    cases.append(("synthetic screen (5 ch, 1080²)", "synth", str(screen / "load_data.csv")))
    rows = []
    for name, kind, src in cases:
        n, dt, mem = _measure(_celldino, kind, src, str(tmp / f"cd_{kind}"))
        pn, pdt, pmem = _measure(_peer, kind, src, str(tmp / f"peer_{kind}"))
        rows.append((name, n, n / dt, mem, pn, pn / pdt, pmem))
    print(
        "\n| data | celldino cells | celldino cells/s | celldino peak MB (traced) | peer cells | "
        "peer cells/s | peer peak MB (traced) | speed ratio (celldino/peer) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, n, r, m, pn, pr, pm in rows:
        print(f"| {name} | {n} | {r:.1f} | {m:.0f} | {pn} | {pr:.1f} | {pm:.0f} | {r / pr:.2f} |")
    features_table(tmp, cases[0] if SHARED.exists() else None)
    shutil.rmtree(tmp, ignore_errors=True)


FEATURE_RUNS = ("", "fast", "all")


def features_table(tmp: Path, ped) -> None:
    """cells/s with CellProfiler's measurements (cp_measure) off and on, per feature set, beside
    the plain-script peer, on the pediatric site and on one plate of the demo screen (256², the
    size `make demo` prepares)."""
    from celldino.config import SynthConfig
    from celldino.synth import make_screen

    screen = make_screen(tmp / "demo", SynthConfig(preset="demo", n_plates=1, n_batches=1))
    cases = [("demo screen, 1 plate (5 ch, 256²)", "demo", str(screen / "load_data.csv"))]
    if ped is not None:
        cases.insert(0, ped)
    print(
        "\n| data | features | cells | celldino cells/s | peer cells/s | ratio (celldino/peer) "
        "| feature cost s/cell |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, kind, src in cases:
        pn, pdt, _ = _measure(_peer, "ped" if kind == "ped" else "synth", src, str(tmp / "pf"))
        shutil.rmtree(tmp / "pf", ignore_errors=True)
        base = None
        for fam in FEATURE_RUNS:
            out = tmp / f"f_{kind}_{fam or 'off'}"
            n, dt, _ = _measure(_celldino, kind, src, str(out), families=fam)
            shutil.rmtree(out, ignore_errors=True)
            base = dt if not fam else base
            cost = f"{(dt - base) / n:.3f}" if fam else "-"
            print(
                f"| {name} | {fam or 'off'} | {n} | {n / dt:.1f} | {pn / pdt:.1f} | "
                f"{(n / dt) / (pn / pdt):.2f} | {cost} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
