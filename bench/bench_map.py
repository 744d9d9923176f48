"""mAP time and peak memory: celldino (blocked) vs copairs, same profiles, same numbers.

Profiles: N × 100 features; compounds with 4 replicate wells each (signal + noise) and 5 %
DMSO wells; replicate retrieval (positives: same compound; negatives: every other compound and
the controls), then per-compound mAP with permutation p-values (null_size 1000) and BH FDR.
Each run is a separate process (peak RSS = its own ru_maxrss); copairs runs under an
address-space cap and a timeout and is reported as killed when it exceeds them.

Run: .venv/bin/python bench/bench_map.py [--sizes 10000 50000] [--cap-gb 12] [--timeout 900]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import pandas as pd

NULL_SIZE = 1000


def make_profiles(n: int, d: int = 100, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    n_ctrl = n // 20
    n_cpd = (n - n_ctrl) // 4
    cpd = np.concatenate([np.repeat(np.arange(n_cpd), 4), np.full(n - 4 * n_cpd, -1)])
    strength = rng.uniform(0, 1, n_cpd)
    centres = rng.normal(size=(n_cpd, d)) * strength[:, None]
    X = rng.normal(size=(n, d))
    X[cpd >= 0] += centres[cpd[cpd >= 0]]
    ctrl = cpd < 0
    meta = pd.DataFrame(
        {
            "Metadata_Compound": np.where(ctrl, "DMSO", pd.Series(cpd).map("c{}".format)),
            "Metadata_pert_type": np.where(ctrl, "control", "trt"),
            "Metadata_reference_index": np.where(ctrl, np.arange(n), -1),
        }
    )
    return meta, X


RULES = {
    "pos_sameby": ["Metadata_Compound", "Metadata_reference_index"],
    "pos_diffby": [],
    "neg_sameby": [],
    "neg_diffby": ["Metadata_Compound"],
}


def worker(tool: str, n: int) -> None:
    meta, X = make_profiles(n)
    t0 = time.perf_counter()
    if tool == "celldino":
        import torch

        torch.set_num_threads(2)
        from celldino.eval.map import average_precision, mean_average_precision

        ap = average_precision(meta, X, method="blocked", show_progress=False, **RULES)
        maps = mean_average_precision(ap, sameby=["Metadata_Compound"], null_size=NULL_SIZE)
    else:
        from copairs.map import average_precision, mean_average_precision

        ap = average_precision(meta, X, progress_bar=False, **RULES)
        with tempfile.TemporaryDirectory() as cache:
            maps = mean_average_precision(
                ap, ["Metadata_Compound"], NULL_SIZE, 0.05, 0, progress_bar=False, cache_dir=cache
            )
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB)
    print(
        json.dumps(
            {
                "seconds": seconds,
                "peak_mib": peak,
                "mAP": float(maps.mean_average_precision.mean()),
                "p_sum": float(maps.p_value.sum()),
                "fraction": float((maps.corrected_p_value < 0.05).mean()),
            }
        )
    )


def run(tool: str, n: int, cap_gb: float, timeout: float) -> dict:
    def limit() -> None:
        if tool == "copairs" and cap_gb > 0:
            cap = int(cap_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    cmd = [sys.executable, __file__, "--worker", tool, "--n", str(n)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, preexec_fn=limit
        )
    except subprocess.TimeoutExpired:
        return {"status": f"timeout > {timeout:.0f} s"}
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1][:80]
        oom = "MemoryError" in proc.stderr or "Unable to allocate" in proc.stderr
        why = "out of memory" if oom or proc.returncode < 0 else tail
        elapsed = time.perf_counter() - t0
        return {"status": f"failed after {elapsed:.0f} s ({why}; cap {cap_gb:g} GiB)"}
    return {"status": "ok", **json.loads(proc.stdout.strip().splitlines()[-1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10000, 50000])
    ap.add_argument("--cap-gb", type=float, default=12.0)
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--worker", choices=["celldino", "copairs"])
    ap.add_argument("--n", type=int)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.n)
        return
    print(
        f"mAP benchmark: 100 features, 4 replicates/compound, 5% DMSO, null_size={NULL_SIZE}; "
        f"copairs capped at {args.cap_gb:g} GiB address space, timeout {args.timeout:.0f} s"
    )
    print(
        "| profiles | tool | time (s) | peak RSS (MiB) | mAP | fraction q<0.05 | ratio vs copairs |"
    )
    print("|---|---|---|---|---|---|---|")
    for n in args.sizes:
        res = {t: run(t, n, args.cap_gb, args.timeout) for t in ("copairs", "celldino")}
        for tool, r in res.items():
            if r["status"] != "ok":
                print(f"| {n} | {tool} | {r['status']} | | | | |", flush=True)
                continue
            ratio = ""
            if tool == "celldino" and res["copairs"]["status"] == "ok":
                c = res["copairs"]
                ratio = (
                    f"time ×{c['seconds'] / r['seconds']:.2f} faster, memory "
                    f"×{c['peak_mib'] / r['peak_mib']:.2f} less; "
                    f"|ΔmAP|={abs(c['mAP'] - r['mAP']):.1e}, "
                    f"Σ|Δp|={abs(c['p_sum'] - r['p_sum']):.1e}"
                )
            print(
                f"| {n} | {tool} | {r['seconds']:.1f} | {r['peak_mib']:.0f} | {r['mAP']:.4f} | "
                f"{r['fraction']:.3f} | {ratio} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
