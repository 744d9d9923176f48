"""Illumination functions against the synthetic screen's planted vignetting, by images per plate.

Draws one screen with the README tour's settings (`tiny` preset, 128 px sites, 30 cells per
site) but 7 sites per well and 4 plates (108-112 QC-passing images per plate), takes each
plate's background blocks once, then for each number of images per plate (5 to 100) fits the
functions on random subsets of the plate's QC-passing images (`--draws` subsets per plate) and
compares each (plate, channel) function that is used (applied, or flat) with the planted
vignetting (`synth.render.camera`, scaled to a minimum of 1): worst pixel and median pixel
relative error, and the fraction of (plate, channel) functions applied. `old` is
`celldino.data.illumination` as it was before issue 21 (`git show BASELINE:...`: per-block free
intercepts, the significance test alone), `new` the working tree's default.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_illumination.py [--draws 5] [--cells 30]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

NS = (5, 10, 15, 25, 50, 100)
BASELINE = "bb223ae"  # the last commit before issue 21's illumination changes
ROOT = Path(__file__).resolve().parents[1]


def baseline_module():
    """celldino.data.illumination as of BASELINE, imported from `git show` (a temp file)."""
    import importlib.util
    import subprocess

    src = subprocess.run(
        ["git", "show", f"{BASELINE}:src/celldino/data/illumination.py"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    path = Path(tempfile.mkdtemp()) / "illumination_baseline.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("illumination_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def planted(truth: pd.Series, h: int, w: int) -> np.ndarray:
    """The synthetic screen's flat field (synth.render.camera), scaled to a minimum of 1."""
    yy, xx = np.mgrid[0:h, 0:w]
    r2 = ((xx - truth.vignette_x) ** 2 + (yy - truth.vignette_y) ** 2) / (0.5 * (h**2 + w**2))
    vig = 1 - truth.vignette * r2
    return vig / vig.min()


def blocks_of(screen: Path, module=None):
    from celldino.data import illumination
    from celldino.data.imagesets import ImageSet
    from celldino.io.tables import read_load_data

    df, chans = read_load_data(screen / "load_data.csv")
    iset = ImageSet(df, chans)
    acc = (module or illumination).IlluminationAccumulator()
    for i in range(len(iset)):
        acc.add(str(iset.table.at[i, "Metadata_Plate"]), iset.read(i), key=iset.key(i))
    ok = iset.table.Metadata_QC_Truth == "ok"
    passing = iset.table.loc[ok].groupby("Metadata_Plate")["Metadata_ImageKey"].apply(list)
    return acc, passing.to_dict(), chans


def run(acc, passing: dict, truth: pd.DataFrame, draws: int) -> list[dict]:
    rows = []
    for n in NS:
        for plate, keys in passing.items():
            if n > len(keys):
                continue
            rng = np.random.default_rng([n, int(plate[1:])])
            for d in range(draws):
                sub = set(rng.choice(keys, n, replace=False))
                fns, report = acc.functions(passing=sub)
                fn = fns[plate]
                want = planted(truth.loc[plate], *fn.shape[1:])
                for c, ch in enumerate(report[plate]["channels"]):
                    rel = np.abs(fn[c] / want - 1)
                    rows.append(
                        {
                            "n": n,
                            "plate": plate,
                            "draw": d,
                            "channel": c,
                            "applied": ch["status"] == "applied",
                            "range": float(fn[c].max()),
                            "worst": float(rel.max()),
                            "typical": float(np.median(rel)),
                            "flat_worst": float(1 - 1 / want.max()),
                            "fitted_range": ch.get("fitted_range", np.nan),
                            "disagreement": ch.get("disagreement", np.nan),
                        }
                    )
    return rows


def main() -> None:
    from celldino.config import SynthConfig
    from celldino.synth import make_screen

    ap = argparse.ArgumentParser()
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--cells", type=int, default=30)
    ap.add_argument("--screen", default="", help="reuse a screen folder (drawn there if empty)")
    ap.add_argument("--behaviours", default="old,new")
    ap.add_argument("--dump", default="", help="write every (plate, channel, draw) row here")
    args = ap.parse_args()
    logging.disable(logging.WARNING)  # the per-plate warnings, hundreds of fits
    with tempfile.TemporaryDirectory() as tmp:
        screen = Path(args.screen or tmp) / "screen"
        if not (screen / "truth_images.parquet").exists():
            cfg = SynthConfig(
                preset="tiny", seed=0, n_plates=4, n_batches=2, sites_per_well=7,
                cells_per_site=args.cells,
            )  # fmt: skip
            make_screen(screen, cfg)
        truth = pd.read_parquet(screen / "truth_images.parquet").groupby("Metadata_Plate").first()
        out = []
        for name in args.behaviours.split(","):
            acc, passing, chans = blocks_of(screen, baseline_module() if name == "old" else None)
            df = pd.DataFrame(run(acc, passing, truth, args.draws))
            df["behaviour"] = name
            out.append(df)
        df = pd.concat(out)
        sizes = [len(v) for v in passing.values()]
        print(
            f"screen: {len(passing)} plates, {min(sizes)}-{max(sizes)} QC-passing images per "
            f"plate, {args.cells} cells per 128 px site, planted vignetting "
            + ", ".join(f"{planted(t, 128, 128).max():.3f}x" for _, t in truth.iterrows())
        )
    g = df.groupby(["n", "behaviour"], sort=False)
    table = pd.DataFrame(
        {
            "plate×channel": g.size(),
            "applied": g.applied.mean().round(2),
            "worst err (used fn), median": g.worst.median().round(3),
            "p95": g.worst.quantile(0.95).round(3),
            "max": g.worst.max().round(3),
            "median-pixel err, median": g.typical.median().round(3),
            "max range applied": g.range.max().round(2),
        }
    )
    flat = df.groupby("n").flat_worst.median().round(3)
    applied = df[df.applied].groupby(["n", "behaviour"], sort=False)
    table["max applied"] = applied.worst.max().round(3)
    print(table.to_string())
    new = df[df.applied & (df.behaviour == "new")]
    for n, chs in new.groupby("n").channel:
        print(f"new, {n} images: applied channels {sorted({chans[i] for i in chs})}")
    if args.dump:
        df.to_parquet(args.dump)
    print(f"\nleft flat, the worst-pixel error is 1 - 1/planted range: median {flat.iloc[0]}")


if __name__ == "__main__":
    main()
