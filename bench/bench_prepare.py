"""Benchmark `prepare`: cells per second from multi-channel TIFFs to crops in the store.

Measures segmentation + cropping + writing (features off, illumination on) and the peak traced
memory (tracemalloc: Python + NumPy buffers) of each run, in its own process, on the real pediatric Cell Painting site (6 channels,
1080x1080) and on a synthetic screen with 1080x1080 fields. Peer, measured in the same run: a
plain script (tifffile + skimage Otsu/label + numpy crops, one .npy file per cell, DeepProfiler-
export style) on the same images.

    .venv/bin/python bench/bench_prepare.py
"""

from __future__ import annotations

import multiprocessing as mp
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "cellpainting_fovs"
PED_MAP = {"5": "DNA", "2": "ER", "6": "RNA", "3": "AGP", "4": "Mito", "1": "Brightfield"}


def _celldino(kind: str, src: str, out: str, q) -> None:
    from celldino.config import PrepareConfig
    from celldino.data.prepare import prepare

    if kind == "ped":
        cfg = PrepareConfig(
            image_dir=src,
            pattern="opera_phenix",
            channel_map=PED_MAP,
            plate="BR00143976",
            out_dir=out,
            features=False,
        )
    else:
        cfg = PrepareConfig(load_data=src, out_dir=out, features=False, qc_exclude=False)
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


def _measure(fn, *args):
    q = mp.get_context("spawn").Queue()
    p = mp.get_context("spawn").Process(target=fn, args=(*args, q))
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
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
