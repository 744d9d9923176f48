"""`celldino profile`'s aggregation at screen scale: time and peak memory against the number of
cell rows (issue 23, item 4).

For each size N (rows), simulated per-cell embeddings are written as Parquet shards in chunks
(one shard in memory at a time, never the whole table): 64 float32 features `emb_0000…emb_0063`
and Metadata_Plate / Metadata_Well / Metadata_Site, 384-well plates, 2,000-5,000 cells per well
(uniform), 9 sites per well, cells in plate → well → site order as extraction writes them. Each
well's features are its own random offset plus unit noise, so wells differ.

The aggregation is `celldino.pp.aggregate` (the code path `celldino profile` runs: one DuckDB
query over the shards, `profile.memory_limit`, spilling under the temp directory), in a fresh
process per size; its peak memory is that process's VmHWM (peak RSS, DuckDB included, read in
the process after the aggregation and before the check below). Wall time covers the aggregation
call only (imports excluded). Correctness at every size, independent of DuckDB: the profiles of
three wells (first, middle, last) are recomputed with numpy from their rows, read back with
pyarrow, and compared.

Features are written without Parquet dictionary encoding (pyarrow's default tries a dictionary
for every column, which for distinct floats makes the files 1.5x larger: 3.67 GiB for 10^7 rows
instead of 2.39). The shards of a size are deleted before the next size is written. Before each size the free disk
is checked (`--keep-free` GiB must stay free; median needs a second, partitioned copy of the cells
under the temp directory), and a size that does not fit is skipped and said so.

    OMP_NUM_THREADS=1 .venv/bin/python bench/aggregate_scale.py --sizes 1e6,1e7 \
        --out /tmp/exp/agg            # then 3e7, 1e8 when the disk and the machine allow
    .venv/bin/python bench/aggregate_scale.py --plot results.jsonl docs/aggregate_scale.png
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

D = 64
WELLS_PER_PLATE = 384
SITES = 9
CELLS_PER_WELL = (2000, 5000)
WELLS = [f"{r}{c:02d}" for r in "ABCDEFGHIJKLMNOP" for c in range(1, 25)]  # 384


def well_sizes(n: int, seed: int) -> np.ndarray:
    """Cells per well (in plate → well order) summing to n (the last well cut short)."""
    rng = np.random.default_rng([seed, 1])
    sizes = rng.integers(CELLS_PER_WELL[0], CELLS_PER_WELL[1] + 1, n // CELLS_PER_WELL[0] + 1)
    ends = np.cumsum(sizes)
    k = int(np.searchsorted(ends, n)) + 1
    sizes = sizes[:k].copy()
    sizes[-1] -= int(ends[k - 1] - n)
    return sizes


def well_effects(n_wells: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, 2]).normal(0, 1, (n_wells, D)).astype(np.float32)


def generate(folder: Path, n: int, shard_rows: int, seed: int = 0) -> dict:
    """Write n rows as shards of `shard_rows`; returns the layout (for the numpy check)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    sizes = well_sizes(n, seed)
    starts = np.concatenate([[0], np.cumsum(sizes)])  # row where each well starts
    effects = well_effects(len(sizes), seed)
    n_plates = -(-len(sizes) // WELLS_PER_PLATE)
    plates = pa.array([f"P{p:04d}" for p in range(n_plates)])
    wells = pa.array(WELLS)
    names = [f"emb_{i:04d}" for i in range(D)]
    rng = np.random.default_rng([seed, 3])
    t0 = time.perf_counter()
    n_shards = -(-n // shard_rows)
    for k in range(n_shards):
        lo, hi = k * shard_rows, min((k + 1) * shard_rows, n)
        rows = np.arange(lo, hi)
        w = np.searchsorted(starts, rows, side="right") - 1  # well index of each row
        site = ((rows - starts[w]) * SITES // sizes[w]).astype(np.int32)
        x = rng.standard_normal((hi - lo, D), dtype=np.float32)
        x += effects[w]
        cols = {
            "Metadata_Plate": pa.DictionaryArray.from_arrays(
                pa.array((w // WELLS_PER_PLATE).astype(np.int32)), plates
            ),
            "Metadata_Well": pa.DictionaryArray.from_arrays(
                pa.array((w % WELLS_PER_PLATE).astype(np.int32)), wells
            ),
            "Metadata_Site": pa.array(site),
        }
        xt = np.ascontiguousarray(x.T)
        del x
        cols |= {name: pa.array(xt[i]) for i, name in enumerate(names)}
        pq.write_table(
            pa.table(cols),
            folder / f"part-{k:05d}.parquet",
            compression="snappy",
            use_dictionary=["Metadata_Plate", "Metadata_Well"],  # not the float features
        )
        del xt, cols
        if k % max(1, n_shards // 10) == 0 or k == n_shards - 1:
            print(
                f"  generate: shard {k + 1}/{n_shards} ({hi:,} rows, "
                f"{time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    return {
        "sizes": sizes.tolist(),
        "shard_rows": shard_rows,
        "seed": seed,
        "n_shards": n_shards,
        "gen_s": time.perf_counter() - t0,
    }


def _peak_rss_gib() -> float:
    """VmHWM (peak resident set) of this process, in GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def _check_wells(folder: Path, layout: dict, adata, method: str) -> dict:
    """Recompute the profiles of three wells with numpy from their rows (read with pyarrow)."""
    import pyarrow.parquet as pq

    sizes = np.asarray(layout["sizes"])
    starts = np.concatenate([[0], np.cumsum(sizes)])
    S = layout["shard_rows"]
    obs = adata.obs.reset_index(drop=True)
    worst = 0.0
    checked = []
    for w in sorted({0, len(sizes) // 2, len(sizes) - 1}):
        lo, hi = int(starts[w]), int(starts[w + 1])
        parts = []
        for k in range(lo // S, (hi - 1) // S + 1):
            t = pq.read_table(folder / f"part-{k:05d}.parquet")
            a, b = max(lo, k * S) - k * S, min(hi, (k + 1) * S) - k * S
            parts.append(np.column_stack([t[f"emb_{i:04d}"].to_numpy()[a:b] for i in range(D)]))
            del t
        x = np.concatenate(parts).astype(np.float64)  # (cells of the well, D)
        want = np.median(x, axis=0) if method == "median" else x.mean(axis=0)
        plate, well = f"P{w // WELLS_PER_PLATE:04d}", WELLS[w % WELLS_PER_PLATE]
        hit = np.flatnonzero(
            (obs["Metadata_Plate"].astype(str) == plate).to_numpy()
            & (obs["Metadata_Well"].astype(str) == well).to_numpy()
        )
        assert len(hit) == 1, (plate, well, len(hit))
        got = np.asarray(adata.X[hit[0]], dtype=np.float64)
        assert int(obs["Metadata_Count_Cells"].iloc[hit[0]]) == hi - lo
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        worst = max(worst, float(np.abs(got - want).max()))
        checked.append(f"{plate}/{well} ({hi - lo} cells)")
    return {"checked": checked, "max_abs_diff": worst}


def run_child(args) -> None:
    """One aggregation in this (fresh) process; prints one JSON line."""
    from celldino.pp.aggregate import aggregate

    folder = Path(args.dir)
    layout = json.loads((folder / "layout.json").read_text())
    t0 = time.perf_counter()
    adata = aggregate(
        str(folder),
        method=args.method,
        memory_limit=args.memory_limit,
        threads=args.threads,
        temp_dir=args.temp_dir or None,
    )
    seconds = time.perf_counter() - t0
    peak = _peak_rss_gib()
    check = _check_wells(folder, layout, adata, args.method)
    expected = len(layout["sizes"])
    assert adata.n_obs == expected, (adata.n_obs, expected)
    print(
        "RESULT "
        + json.dumps({"seconds": seconds, "peak_rss_gib": peak, "profiles": adata.n_obs, **check}),
        flush=True,
    )


def _du_gib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("*.parquet")) / 2**30


def _free_gib(path: Path) -> float:
    return shutil.disk_usage(path).free / 2**30


def main_run(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    methods = args.methods.split(",")
    for n in sizes:
        raw = n * (D * 4 + 12) / 2**30  # features + metadata, uncompressed
        need = raw * (2 if "median" in methods and n <= args.median_max else 1)
        free = _free_gib(out)
        print(f"== {n:,} rows: ~{raw:.1f} GiB of shards, {free:.1f} GiB free", flush=True)
        if need > args.budget or free - need < args.keep_free:
            print(
                f"   skipped: needs ~{need:.1f} GiB (budget {args.budget} GiB, keeping "
                f"{args.keep_free} GiB free of {free:.1f})",
                flush=True,
            )
            continue
        data = out / f"cells_{n}"
        shutil.rmtree(data, ignore_errors=True)
        try:
            layout = generate(data, n, args.shard_rows)
            (data / "layout.json").write_text(json.dumps(layout))
            on_disk = _du_gib(data)
            print(f"   generated {on_disk:.2f} GiB in {layout['gen_s']:.0f} s", flush=True)
            for method in methods:
                if method == "median" and n > args.median_max:
                    print(f"   median skipped above --median-max={args.median_max:,}", flush=True)
                    continue
                cmd = [
                    sys.executable,
                    __file__,
                    "_child",
                    "--dir",
                    str(data),
                    "--method",
                    method,
                    "--memory-limit",
                    args.memory_limit,
                    "--threads",
                    str(args.threads),
                    "--temp-dir",
                    str(out / "tmp"),
                ]
                (out / "tmp").mkdir(exist_ok=True)
                load = os.getloadavg()[0]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if proc.returncode != 0 or line is None:
                    print(proc.stdout[-2000:], proc.stderr[-4000:])
                    raise SystemExit(f"aggregation of {n:,} rows ({method}) failed")
                res = json.loads(line[len("RESULT ") :])
                row = {
                    "rows": n,
                    "method": method,
                    "shards": layout["n_shards"],
                    "gib_on_disk": on_disk,
                    "gen_s": layout["gen_s"],
                    "load_before": load,
                    "memory_limit": args.memory_limit,
                    "threads": args.threads,
                    **res,
                }
                with results.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
                print(
                    f"   {method}: {res['seconds']:.1f} s, peak RSS {res['peak_rss_gib']:.2f} "
                    f"GiB, {res['profiles']} profiles; checked {res['checked']} "
                    f"(max |diff| {res['max_abs_diff']:.1e})",
                    flush=True,
                )
        finally:
            if not args.keep:
                shutil.rmtree(data, ignore_errors=True)
    table(results)


def table(results: Path) -> None:
    rows = [json.loads(x) for x in results.read_text().splitlines() if x.strip()]
    print(
        "| rows | method | shards | GiB on disk | seconds | rows/s | peak RSS GiB | "
        "time ratio | rows ratio | load |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["rows"])
        base = mine[0]
        for r in mine:
            print(
                f"| {r['rows']:,} | {method} | {r['shards']} | {r['gib_on_disk']:.2f} | "
                f"{r['seconds']:.1f} | {r['rows'] / r['seconds']:,.0f} | "
                f"{r['peak_rss_gib']:.2f} | {r['seconds'] / base['seconds']:.1f}× | "
                f"{r['rows'] / base['rows']:.0f}× | {r['load_before']:.1f} |"
            )


def plot(results: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in results.read_text().splitlines() if x.strip()]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    for method, marker in (("mean", "o"), ("median", "s")):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["rows"])
        if not mine:
            continue
        n = [r["rows"] for r in mine]
        a.loglog(n, [r["seconds"] for r in mine], marker=marker, label=method)
        b.semilogx(n, [r["peak_rss_gib"] for r in mine], marker=marker, label=method)
    lo = min(r["rows"] for r in rows)
    hi = max(r["rows"] for r in rows)
    base = min((r for r in rows if r["method"] == "mean"), key=lambda r: r["rows"])
    a.loglog(
        [lo, hi],
        [base["seconds"], base["seconds"] * hi / lo],
        ls=":",
        c="grey",
        label="linear in rows",
    )
    a.set(xlabel="cell rows (64 float32 features)", ylabel="wall time (s)", title="time")
    limit = float(str(base["memory_limit"]).upper().rstrip("GIB") or "nan")
    b.axhline(4, c="red", ls="--", lw=1, label="4 GiB target")
    if limit == limit:
        b.axhline(limit, c="grey", ls=":", lw=1, label=f"memory_limit {base['memory_limit']}")
    b.set(xlabel="cell rows", ylabel="peak RSS (GiB)", title="peak memory", ylim=(0, 4.5))
    for ax in (a, b):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"celldino profile aggregation, up to {hi:,} rows (2-core shared VM)", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        p = argparse.ArgumentParser()
        p.add_argument("_child")
        p.add_argument("--dir", required=True)
        p.add_argument("--method", default="mean")
        p.add_argument("--memory-limit", default="2GB")
        p.add_argument("--threads", type=int, default=0)
        p.add_argument("--temp-dir", default="")
        run_child(p.parse_args())
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1e6,1e7,3e7,1e8")
    p.add_argument("--methods", default="mean,median")
    p.add_argument("--median-max", type=float, default=1e7, help="largest size run with median")
    p.add_argument("--out", default="/tmp/celldino_aggregate_scale")
    p.add_argument("--shard-rows", type=int, default=262_144)
    p.add_argument("--memory-limit", default="2GB", help="profile.memory_limit")
    p.add_argument("--threads", type=int, default=0, help="profile.threads (0 = all cores)")
    p.add_argument("--budget", type=float, default=35.0, help="GiB this script may write")
    p.add_argument("--keep-free", type=float, default=15.0, help="GiB of disk left free")
    p.add_argument("--keep", action="store_true", help="keep the shards (default: delete)")
    p.add_argument("--table", metavar="RESULTS", help="print the table of a results.jsonl")
    p.add_argument("--plot", nargs=2, metavar=("RESULTS", "PNG"))
    args = p.parse_args()
    if args.table:
        table(Path(args.table))
    elif args.plot:
        plot(Path(args.plot[0]), Path(args.plot[1]))
    else:
        main_run(args)


if __name__ == "__main__":
    main()
