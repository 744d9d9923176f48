"""LINCS plate SQ00015054: compound retrieval across doses and phenotypic activity vs DMSO.

Prints celldino's numbers next to copairs' own computation on the same wells (the numbers in
docs/validation.md). Run: .venv/bin/python bench/lincs_retrieval.py [--null-size 10000]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from copairs.map import average_precision as copairs_ap
from copairs.map import mean_average_precision as copairs_map

from celldino.eval.activity import phenotypic_activity
from celldino.eval.map import retrieval_map, summarize

ROOT = Path(__file__).resolve().parents[1]
CSV = ROOT.parent / "shared/data/lincs_SQ00015054/SQ00015054_normalized_feature_select.csv.gz"
CPD, DOSE = "Metadata_broad_sample", "Metadata_mmoles_per_liter"


def main() -> None:
    ap_ = argparse.ArgumentParser(description=__doc__)
    ap_.add_argument("--null-size", type=int, default=10000)
    ap_.add_argument("--seed", type=int, default=0)
    args = ap_.parse_args()
    df = pd.read_csv(CSV)
    meta = df[[c for c in df.columns if c.startswith("Metadata_")]]
    X = df[[c for c in df.columns if not c.startswith("Metadata_")]].to_numpy(float)
    kw = {
        "null_size": args.null_size,
        "seed": args.seed,
        "show_progress": False,
        "method": "blocked",
    }

    _, act, act_summary = phenotypic_activity(meta, X, by=[CPD], **kw)
    _, ret = retrieval_map(meta, X, by=[CPD], pos_diffby=[DOSE], negatives="others", **kw)
    ret_summary = summarize(ret)

    # copairs' own recipe: each control gets its own reference index
    m = meta.copy()
    ctrl = (m.Metadata_pert_type == "control").to_numpy()
    m["ref"] = np.where(ctrl, np.arange(len(m)), -1)
    with tempfile.TemporaryDirectory() as cache:
        ref_act = copairs_map(
            copairs_ap(m, X, [CPD, "ref"], [], [], [CPD, "ref"], progress_bar=False),
            [CPD],
            args.null_size,
            0.05,
            args.seed,
            progress_bar=False,
            cache_dir=cache,
        )
    with tempfile.TemporaryDirectory() as cache:
        ref_ret = copairs_map(
            copairs_ap(m, X, [CPD, "ref"], [DOSE], [], [CPD], progress_bar=False),
            [CPD],
            args.null_size,
            0.05,
            args.seed,
            progress_bar=False,
            cache_dir=cache,
        )
    print(
        f"LINCS SQ00015054: {len(df)} wells ({ctrl.sum()} DMSO), {X.shape[1]} features, "
        f"null_size={args.null_size}, seed={args.seed}"
    )
    print("| task | groups | mAP celldino | mAP copairs | fraction q<0.05 celldino | copairs |")
    print("|---|---|---|---|---|---|")
    for name, ours, s, ref in (
        ("phenotypic activity vs DMSO (per compound, all doses)", act, act_summary, ref_act),
        ("compound retrieval across doses (vs other compounds + DMSO)", ret, ret_summary, ref_ret),
    ):
        print(
            f"| {name} | {len(ours)} | {s['mAP']:.4f} | "
            f"{ref.mean_average_precision.mean():.4f} | {s['fraction_retrieved']:.3f} | "
            f"{ref.below_corrected_p.mean():.3f} |"
        )
        diff = np.abs(
            ours.mean_average_precision.to_numpy() - ref.mean_average_precision.to_numpy()
        ).max()
        pdiff = np.abs(ours.p_value.to_numpy() - ref.p_value.to_numpy()).max()
        print(f"|   max per-compound difference | | {diff:.1e} | | p-value {pdiff:.1e} | |")
    top = act.sort_values("mean_average_precision", ascending=False).head(5)
    print("\nmost active compounds vs DMSO:")
    moa = meta.groupby(CPD)["Metadata_moa"].first()
    for _, r in top.iterrows():
        print(
            f"  {r[CPD]}  mAP={r.mean_average_precision:.3f}  q={r.corrected_p_value:.4f}"
            f"  moa={moa.get(r[CPD])}"
        )


if __name__ == "__main__":
    main()
