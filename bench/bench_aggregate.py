"""Aggregate per-cell embeddings (N cells × 384 float32) into well profiles: celldino vs pycytominer.

Writes synthetic Parquet shards (500k cells each; Metadata_Plate/Well/Site + emb_0000…emb_0383)
to a temporary folder, then times each tool in a fresh subprocess and reads that process's peak
RSS (VmHWM of the child process, reading included). celldino runs
`pp.aggregate` (DuckDB over the shards, memory_limit below); pycytominer reads the shards with
pandas and calls `pycytominer.aggregate` (what its users do). Both results are compared.

    .venv/bin/python bench/bench_aggregate.py                       # 0.5M, 1M, 2M vs peer; 10M alone
    .venv/bin/python bench/bench_aggregate.py --sizes 500000 --big 0   # quick
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

D = 384
SHARD = 500_000
PLATE_CELLS = 400_000  # cells per plate (plates follow cell order, as shards from extraction)


def generate(folder: Path, n: int, seed: int = 0) -> list[Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    wells = np.array([f"{r}{c:02d}" for r in "ABCDEFGHIJKLMNOP" for c in range(1, 25)])
    paths = []
    for start in range(0, n, SHARD):
        m = min(SHARD, n - start)
        idx = np.arange(start, start + m)
        cols = {
            "Metadata_Plate": pa.array(np.char.add("PL", (idx // PLATE_CELLS).astype(str))),
            "Metadata_Well": pa.array(wells[rng.integers(0, len(wells), m)]),
            "Metadata_Site": pa.array(rng.integers(1, 10, m).astype(np.int32)),
        }
        X = rng.standard_normal((m, D), dtype=np.float32)
        for j in range(D):
            cols[f"emb_{j:04d}"] = pa.array(X[:, j])
        path = folder / f"part-{start // SHARD:05d}.parquet"
        pq.write_table(
            pa.table(cols),
            path,
            row_group_size=100_000,
            compression="snappy",
            use_dictionary=["Metadata_Plate", "Metadata_Well"],
        )
        paths.append(path)
    return paths


def worker(tool: str, files: list[str], method: str, out: str, memory_limit: str) -> None:
    import pandas as pd

    keys = ["Metadata_Plate", "Metadata_Well"]
    feats = [f"emb_{j:04d}" for j in range(D)]
    # imports happen before the clock starts: only reading + aggregating is timed
    if tool == "celldino":
        from celldino.io.profiles import anndata_to_frame
        from celldino.pp import aggregate

        t0 = time.perf_counter()
        adata = aggregate(
            files, by=keys, features=feats, method=method, memory_limit=memory_limit, threads=0
        )
        df = anndata_to_frame(adata)
    else:
        from pycytominer import aggregate

        t0 = time.perf_counter()
        cells = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
        df = aggregate(cells, strata=keys, features=feats, operation=method)
    seconds = time.perf_counter() - t0
    peak = _peak_rss()
    df.sort_values(keys)[keys + feats].to_parquet(out, index=False)
    print(json.dumps({"seconds": seconds, "peak_bytes": peak, "rows": len(df)}))


def _peak_rss() -> int:
    """This process's peak RSS in bytes: VmHWM, which starts afresh at exec. (ru_maxrss does
    not: on Linux a child inherits its parent's ru_maxrss through fork + exec.)"""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure(tool: str, files: list[Path], method: str, out: Path, memory_limit: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        tool,
        "--method",
        method,
        "--out",
        str(out),
        "--memory-limit",
        memory_limit,
        *map(str, files),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[500_000, 1_000_000, 2_000_000])
    ap.add_argument("--median-size", type=int, default=1_000_000, help="also compare median (0=no)")
    ap.add_argument("--big", type=int, default=10_000_000, help="celldino alone at this size")
    ap.add_argument("--memory-limit", default="2GB", help="DuckDB memory_limit for celldino")
    ap.add_argument("--tmp", default=tempfile.gettempdir(), help="where shards are written")
    ap.add_argument("--worker", choices=["celldino", "pycytominer"])
    ap.add_argument("--method", default="mean")
    ap.add_argument("--out")
    ap.add_argument("files", nargs="*")
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, a.files, a.method, a.out, a.memory_limit)
        return

    import pandas as pd

    total = max([*a.sizes, a.big])
    need = total * (D * 4 + 16) / 2**30
    free = shutil.disk_usage(a.tmp).free / 2**30
    if need > 0.8 * free:
        sys.exit(f"{a.tmp}: {free:.0f} GiB free, shards need about {need:.0f} GiB; use --tmp")
    root = Path(tempfile.mkdtemp(prefix="celldino_bench_agg_", dir=a.tmp))
    rows = []
    try:
        t0 = time.perf_counter()
        shards = generate(root / "shards", total)
        print(
            f"generated {total:,} cells × {D} float32 in {len(shards)} shards "
            f"({sum(p.stat().st_size for p in shards) / 2**30:.1f} GiB) in "
            f"{time.perf_counter() - t0:.0f} s",
            flush=True,
        )
        plan = [(n, "mean", True) for n in a.sizes]
        if a.median_size:
            plan.append((a.median_size, "median", True))
        if a.big:
            plan.append((a.big, "mean", False))
        for n, method, with_peer in plan:
            files = shards[: -(-n // SHARD)]
            res = {}
            for tool in ["celldino", "pycytominer"] if with_peer else ["celldino"]:
                out = root / f"{tool}_{n}_{method}.parquet"
                res[tool] = measure(tool, files, method, out, a.memory_limit)
                print(f"  {n:>11,} {method:<6} {tool:<12} {res[tool]}", flush=True)
            row = {"cells": n, "method": method}
            for tool, r in res.items():
                row[f"{tool} s"] = r.get("seconds", np.nan)
                row[f"{tool} peak GiB"] = r.get("peak_bytes", np.nan) / 2**30
            if with_peer and "seconds" in res.get("pycytominer", {}):
                row["speed-up"] = res["pycytominer"]["seconds"] / res["celldino"]["seconds"]
                row["memory ratio"] = (
                    res["pycytominer"]["peak_bytes"] / res["celldino"]["peak_bytes"]
                )
                a_df = pd.read_parquet(root / f"celldino_{n}_{method}.parquet")
                b_df = pd.read_parquet(root / f"pycytominer_{n}_{method}.parquet")
                feats = [c for c in a_df.columns if c.startswith("emb_")]
                row["max |diff|"] = float(
                    np.abs(a_df[feats].to_numpy() - b_df[feats].to_numpy()).max()
                )
            rows.append(row)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    table = pd.DataFrame(rows)
    print()
    print(table.to_markdown(index=False, floatfmt=".3g") if _has_tabulate() else table.to_string())


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
