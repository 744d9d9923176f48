"""Benchmark `prepare` in parts on a local Dask cluster (issue 23), and a model of a 300-plate screen.

1. Scaling: a synthetic screen (one plate, `--sites` fields of `--size`² with about `--cells`
   cells, features off, QC exclusion off) prepared (a) by one plain `prepare` (workers=1), then
   (b) by `run_parts_dask` in parts of `--per-part` sites on a `distributed.LocalCluster` of 1
   worker process and (c) of 2, all in this run. Each parted prep is checked equal to the plain
   one (cells and crops). Throughput = sites / wall time; speed-up and parallel efficiency of
   the parts phase (the parts themselves: the plan and the merge run once, on one core) and of
   the whole run, both against the 1-worker cluster. The plan (pass 1) is measured once, in the
   1-worker run; the 2-worker run reuses its files and is charged the same plan time.
2. Engine overhead per part: (1-worker cluster, plan + parts + merge) - (the plain run), over
   the number of parts, against the plain run's work per part; split into the plan (pass 1 again,
   vs none), the Dask tasks (parts wall - work inside the tasks) and the merge.
3. Model inputs on real-size fields (`--model-size`², 150 cells, `--model-sites` sites): pass 1
   (the plan) and pass 2 (a part) per site with CellProfiler's measurements off, `fast` and
   `all`; then the cluster time of a 300-plate screen, assumptions printed.

    OMP_NUM_THREADS=1 .venv/bin/python bench/prepare_parts.py [--sites 100] [--size 512]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd


def _screen(root: Path, size: int, cells: int, n_sites: int, seed: int = 0) -> Path:
    from celldino.config import SynthConfig
    from celldino.synth import make_screen

    folder = root / f"screen_{size}_{cells}"
    if not (folder / "load_data.csv").exists():
        make_screen(
            folder,
            SynthConfig(
                preset="custom",
                seed=seed,
                n_plates=1,
                n_batches=1,
                image_size=size,
                cells_per_site=cells,
                sites_per_well=max(1, -(-n_sites // 16)),  # the custom plate has 16 wells
                n_bad_images=0,
            ),
        )
    ld = pd.read_csv(folder / "load_data.csv", dtype=str)
    if len(ld) < n_sites:
        raise SystemExit(f"the synthetic plate has {len(ld)} sites, fewer than {n_sites}")
    path = root / f"ld_{size}_{cells}_{n_sites}.csv"
    ld.head(n_sites).to_csv(path, index=False)
    return path


def _same(a: Path, b: Path) -> bool:
    import zarr

    ca, cb = pd.read_parquet(a / "cells.parquet"), pd.read_parquet(b / "cells.parquet")
    za, zb = zarr.open_array(str(a / "crops.zarr")), zarr.open_array(str(b / "crops.zarr"))
    return ca.equals(cb) and za.shape == zb.shape and np.array_equal(za[:], zb[:])


def _warm() -> None:
    import celldino.data.parts
    import celldino.data.prepare  # noqa: F401


def _cluster_run(cfg, n_workers: int) -> dict:
    from distributed import Client, LocalCluster

    from celldino.data.parts import run_parts_dask

    t0 = time.perf_counter()
    with (
        LocalCluster(
            n_workers=n_workers, processes=True, threads_per_worker=1, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        client.run(_warm)  # imports once per worker process (not per part)
        t_start = time.perf_counter() - t0
        timings: dict = {}
        t1 = time.perf_counter()
        run_parts_dask(cfg, client, timings=timings)
        total = time.perf_counter() - t1
    timings.update(total=total, start=t_start)
    return timings


def scaling(root: Path, args) -> dict:
    from celldino.config import PrepareConfig
    from celldino.data.prepare import prepare

    ld = _screen(root, args.size, args.cells, args.sites)
    base = PrepareConfig(
        load_data=str(ld), features=False, qc_exclude=False, crop_size=args.crop, workers=1
    )
    n_parts = args.sites // args.per_part
    out = {}
    for d in ("plain", "w1", "w2"):
        shutil.rmtree(root / d, ignore_errors=True)
    t = time.perf_counter()
    prepare(dataclasses.replace(base, out_dir=str(root / "plain")))
    out["plain"] = time.perf_counter() - t
    cells = len(pd.read_parquet(root / "plain" / "cells.parquet"))
    for w in (1, 2):
        cfg = dataclasses.replace(base, out_dir=str(root / f"w{w}"), parts=n_parts)
        if w == 2:  # the plan (pass 1, one process) is measured once, with 1 worker: reuse it
            (root / "w2").mkdir()
            for name in ("qc.parquet", "inputs.parquet", "images.parquet", "prepare.json"):
                shutil.copy2(root / "w1" / name, root / "w2" / name)
            if (root / "w1" / "illum").is_dir():
                shutil.copytree(root / "w1" / "illum", root / "w2" / "illum")
        out[f"w{w}"] = _cluster_run(cfg, w)
    out["w2"]["plan_reused"] = out["w2"]["plan"]
    out["w2"]["plan"] = out["w1"]["plan"]
    out["w2"]["total"] = out["w2"]["total"] - out["w2"]["plan_reused"] + out["w1"]["plan"]
    for w in (1, 2):
        if not _same(root / "plain", root / f"w{w}"):
            raise SystemExit(f"the {w}-worker parts differ from the plain run")
    out.update(sites=args.sites, cells=cells, n_parts=n_parts)
    return out


def model_inputs(root: Path, args) -> dict:
    """Pass 1 and pass 2 seconds per real-size site, features off / fast / all."""
    from celldino.config import PrepareConfig
    from celldino.data import parts as PT

    ld = _screen(root, args.model_size, 150, args.model_sites, seed=1)
    res = {}
    for fam in ("off", "fast", "all"):
        out = root / f"model_{fam}"
        shutil.rmtree(out, ignore_errors=True)
        cfg = PrepareConfig(
            load_data=str(ld),
            out_dir=str(out),
            qc_exclude=False,
            features=fam != "off",
            feature_families=(fam if fam != "off" else "all",),
            parts=1,
        )
        t = time.perf_counter()
        PT.plan(cfg)
        t_plan = time.perf_counter() - t
        t = time.perf_counter()
        PT.run_part(dataclasses.replace(cfg, part=0))
        t_part = time.perf_counter() - t
        t = time.perf_counter()
        PT.merge(cfg)
        t_merge = time.perf_counter() - t
        n_cells = len(pd.read_parquet(out / "cells.parquet"))
        res[fam] = {
            "pass1_per_site": t_plan / args.model_sites,
            "pass2_per_site": t_part / args.model_sites,
            "merge_per_site": t_merge / args.model_sites,
            "cells_per_site": n_cells / args.model_sites,
        }
    return res


def report(s: dict, m: dict | None, args) -> None:
    w1, w2 = s["w1"], s["w2"]
    n = s["sites"]
    print(
        f"\nscreen: {n} sites of {args.size}² (5 channels, ~{args.cells} cells), {s['cells']} "
        f"cells, features off, {s['n_parts']} parts of {args.per_part} sites; load average "
        f"{os.getloadavg()[0]:.2f} at the end\n"
    )
    print(
        "| run | worker processes | wall s (plan + parts + merge) | sites/s | speed-up | efficiency |"
    )
    print("|---|---|---|---|---|---|")
    print(f"| plain `prepare` | 1 | {s['plain']:.1f} | {n / s['plain']:.2f} | - | - |")
    for w, r in ((1, w1), (2, w2)):
        sp, spp = w1["total"] / r["total"], w1["parts"] / r["parts"]
        print(
            f"| Dask LocalCluster, whole run | {w} | {r['total']:.1f} ({r['plan']:.1f} + "
            f"{r['parts']:.1f} + {r['merge']:.1f}) | {n / r['total']:.2f} | {sp:.2f} | {sp / w:.2f} |"
        )
        print(
            f"| Dask LocalCluster, parts phase | {w} | {r['parts']:.1f} | {n / r['parts']:.2f} | "
            f"{spp:.2f} | {spp / w:.2f} |"
        )
    work = sum(x["seconds"] for x in w1["results"])
    over = w1["total"] - s["plain"]
    print(
        f"\nengine overhead, 1 worker: {over:.1f} s over the plain run's {s['plain']:.1f} s = "
        f"{over / s['plain'] * 100:.1f} %, {over / s['n_parts']:.2f} s per part of {args.per_part} "
        f"sites (work per part {s['plain'] / s['n_parts']:.1f} s); of it: Dask tasks "
        f"{w1['parts'] - work:.2f} s (parts wall {w1['parts']:.1f} s - {work:.1f} s inside the "
        f"tasks), merge {w1['merge']:.2f} s, plan {w1['plan']:.1f} s (pass 1, which the plain "
        f"run also does); cluster start and imports in the workers {w1['start']:.1f} s (once "
        "per run, not counted)"
    )
    md = w1["merge_detail"]
    print(
        f"merge: checks {md['check']:.2f} s, crop copy {md['copy']:.2f} s "
        f"({s['cells'] * 5 * args.crop**2 * 2 / md['copy'] / 1e6:.0f} MB/s), finishing "
        f"(cells, skipped, engineered tables) {md['finish']:.2f} s, for {n} sites"
    )
    if not m:
        return
    print("\nper real-size site (s), one process:")
    print("| features | pass 1 (plan) | pass 2 (part) | merge | cells/site |")
    print("|---|---|---|---|---|")
    for fam, r in m.items():
        print(
            f"| {fam} | {r['pass1_per_site']:.2f} | {r['pass2_per_site']:.2f} | "
            f"{r['merge_per_site']:.2f} | {r['cells_per_site']:.0f} |"
        )
    sites = 300 * 384 * 9
    eff = min(1.0, w1["parts"] / w2["parts"] / 2)
    md = w1["merge_detail"]
    rate = s["cells"] * 5 * args.crop**2 * 2 / md["copy"]  # bytes of crops copied per second
    per_site = (md["check"] + md["finish"]) / n  # the merge's tables, per site
    print(
        f"\nmodel: 300 plates x 384 wells x 9 sites = {sites:,} sites of {args.model_size}²; "
        f"parallel efficiency {eff:.2f} (measured above); the plan (pass 1) runs on one core; "
        f"the merge runs on one node: crops copied at the rate measured here ({rate / 1e6:.0f} "
        f"MB/s) as 96 px crops (5 x 96² x 2 B = 92 KB per cell), tables {per_site * 1e3:.1f} ms "
        "per site"
    )
    print("| features | nodes x cores | plan h | parts h | merge h | total h |")
    print("|---|---|---|---|---|---|")
    for fam, r in m.items():
        for nodes, cores in ((10, 32), (50, 32)):
            plan_h = sites * r["pass1_per_site"] / 3600
            parts_h = sites * r["pass2_per_site"] / (nodes * cores * eff) / 3600
            n_cells = sites * r["cells_per_site"]
            merge_h = (n_cells * 5 * 96**2 * 2 / rate + sites * per_site) / 3600
            print(
                f"| {fam} | {nodes} x {cores} | {plan_h:.1f} | {parts_h:.1f} | {merge_h:.1f} | "
                f"{plan_h + parts_h + merge_h:.1f} |"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sites", type=int, default=100)
    ap.add_argument("--per-part", type=int, default=50)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--cells", type=int, default=40)
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--model-size", type=int, default=1080)
    ap.add_argument("--model-sites", type=int, default=1)
    ap.add_argument("--no-model", action="store_true")
    ap.add_argument("--work", type=Path, default=Path("/tmp/celldino_bench_parts"))
    ap.add_argument("--json", type=Path, default=None, help="write the measurements here too")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"load average at the start: {os.getloadavg()[0]:.2f}", flush=True)
    s = scaling(args.work, args)
    m = None if args.no_model else model_inputs(args.work, args)
    report(s, m, args)
    if args.json:
        args.json.write_text(json.dumps({"scaling": s, "model": m}, default=str, indent=1))


if __name__ == "__main__":
    main()
