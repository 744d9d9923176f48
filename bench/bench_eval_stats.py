"""Cost of the metrics' chance levels, permutation nulls and bootstrap intervals at demo size.

A synthetic screen laid out as the demo's (`synth.preset=demo`: 4 plates, 2 batches, 4 MoAs × 2
compounds × 3 doses, 8 DMSO wells per plate: 128 well profiles) with four feature sets as the
demo evaluates (learned 192-d, engineered 60-d, random_init 192-d, pca_engineered 20-d), run
through `celldino evaluate` with the analyses `celldino run` uses for retrieval and
classification (nsc, map_replicate, map_moa, kNN k=1,5 split by plate), default settings
(null_size 10000, n_boot 1000). The peer is the same evaluate before the statistics (the
source tree of a given commit, run in a subprocess with the same inputs).

    git archive c068e53 src | tar -x -C /tmp/before   # the evaluator before the statistics
    .venv/bin/python bench/bench_eval_stats.py --before /tmp/before/src
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ANALYSES = {
    "nsc": {},
    "map_replicate": {},
    "map_moa": {},
    "classify": {"classifiers": ["knn"], "ks": [1, 5], "split_by": "Metadata_Plate"},
}
SETS = {"learned": 192, "engineered": 60, "random_init": 192, "pca_engineered": 20}


def screen() -> pd.DataFrame:
    rows = []
    for p in range(4):
        for m in range(4):
            for c in range(2):
                for d in (0.3, 3.0, 30.0):
                    rows.append((f"P{p}", f"b{p % 2}", f"m{m}c{c}", d, f"MoA{m}", "trt"))
        rows += [(f"P{p}", f"b{p % 2}", "DMSO", 0.0, "control", "control")] * 8
    meta = pd.DataFrame(
        rows,
        columns=[
            "Metadata_Plate",
            "Metadata_Batch",
            "Metadata_Compound",
            "Metadata_Dose",
            "Metadata_MoA",
            "Metadata_pert_type",
        ],
    )
    meta["Metadata_Well"] = [f"W{i % 32:02d}" for i in range(len(meta))]
    return meta


def tables(folder: Path) -> dict[str, str]:
    meta = screen()
    rng = np.random.default_rng(1)
    moa = pd.factorize(meta.Metadata_MoA)[0]
    dose = meta.Metadata_Dose.to_numpy()
    paths = {}
    for name, d in SETS.items():
        centres = rng.normal(size=(moa.max() + 1, d))
        signal = 0.0 if name == "random_init" else 0.6
        X = signal * np.log1p(dose)[:, None] * centres[moa] + rng.normal(size=(len(meta), d))
        feats = pd.DataFrame(X, columns=[f"f{j}" for j in range(d)])
        paths[name] = str(folder / f"{name}.parquet")
        pd.concat([meta, feats], axis=1).to_parquet(paths[name])
    return paths


def run(src: str | None, folder: Path, tag: str) -> float:
    paths = tables(folder)
    spec = {
        "inputs": {k: v for k, v in paths.items() if k != "learned"},
        "columns": {"moa": "Metadata_MoA"},
        "analyses": ANALYSES,
    }
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec))
    out = folder / f"out_{tag}"
    code = (
        "import sys, time; from celldino import cli; t = time.perf_counter(); "
        f"rc = cli.main(['evaluate', {paths['learned']!r}, '--spec', {str(folder / 'spec.yaml')!r},"
        f" 'evaluate.out_dir={out}', 'evaluate.resume=false', '-q']); "
        "print('SECONDS', time.perf_counter() - t); sys.exit(rc)"
    )
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return float(res.stdout.split("SECONDS")[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="src/ folder of the evaluator before")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        before = min(run(args.before, folder, "before") for _ in range(args.repeats))
        after = min(run(None, folder, "after") for _ in range(args.repeats))
        tidy = pd.read_csv(folder / "out_after" / "metrics.csv")
    print(f"{'evaluate (4 sets x 4 analyses, 128 wells)':45s} {'seconds':>8s} {'ratio':>6s}")
    print(f"{'before (peer: no statistics)':45s} {before:8.2f} {1.0:6.2f}")
    print(f"{'after (chance, CI, p_perm, flags)':45s} {after:8.2f} {after / before:6.2f}")
    show = tidy[tidy.chance.notna()][
        ["feature_set", "analysis", "metric", "value", "chance", "ci_low", "ci_high", "p_perm"]
    ]
    print(show.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
