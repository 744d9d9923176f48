"""Phenotypic activity against the controls a normalisation/sphering was fitted on, or not.

Issue 21: on the real LINCS plate (384 wells, 24 DMSO, 58 compounds; pycytominer's
mad_robustize + feature selection already applied) the cellprofiler recipe fitted on all 24
DMSO wells and scored against the same 24 called 58 of 58 compounds active, where the table as
pycytominer wrote it gives 31. This prints, per data set, each way of fitting and scoring:

- the table as given, against all its controls (whether it was normalised on them is unknown),
  and against only the controls the split holds out (the same wells as the rows below);
- the old default: the recipe fitted on every control, scored against the same ones (in-sample);
- the recipe fitted on half of each plate's controls (`profile.fit_controls=half`), scored
  against all controls (`evaluate.activity_negatives=all`) and against the held-out half (the
  new default, `negatives=held_out`);
- `celldino profile`'s default on the table (LINCS: recognised as already normalised, passed
  through).

Columns: activity mAP with its chance level (copairs' expected AP of a random ranking, averaged
over compounds) and 95 % bootstrap interval over compounds, the compounds active at BH q < 0.05,
the negatives used, and replicate retrieval (mAP of a compound's wells among all other wells,
as `map_replicate`) to show what the split costs elsewhere. BBBC021 (raw per-well CellProfiler
means, 29 plates × 6 DMSO) as a second, raw screen: treatments are compound × dose.

Run: .venv/bin/python bench/activity_negatives.py [--null-size 10000] (a few minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from celldino.config import ProfileConfig
from celldino.eval.activity import phenotypic_activity
from celldino.eval.map import retrieval_map
from celldino.pp.fit_split import FIT_COLUMN
from celldino.pp.recipe import process

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared/data"
LINCS = DATA / "lincs_SQ00015054/SQ00015054_normalized_feature_select.csv.gz"
BBBC = DATA / "bbbc021_profiles/bbbc021_per_well_odd_weeks.csv.gz"
CTRL = "Metadata_pert_type == 'control'"


def load(path: Path, compound: str) -> ad.AnnData:
    df = pd.read_csv(path)
    feats = [c for c in df.columns if not c.startswith("Metadata_")]
    meta = df[[c for c in df.columns if c.startswith("Metadata_")]].copy()
    meta[compound] = meta[compound].fillna("DMSO")
    for c in meta.columns:
        meta[c] = meta[c].astype(str)
    a = ad.AnnData(df[feats].to_numpy(float), obs=meta.reset_index(drop=True))
    a.obs_names = (meta["Metadata_Plate"] + "_" + meta["Metadata_Well"]).tolist()
    a.var_names = feats
    return a


def _boot(v: np.ndarray, n: int = 2000) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    means = v[rng.integers(0, len(v), size=(n, len(v)))].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def row(name, meta, X, by, negatives, args, *, fit=None) -> str:
    meta = meta.reset_index(drop=True).copy()
    if fit is not None:  # score the given table against the split's held-out controls
        meta[FIT_COLUMN] = fit
    kw = {"null_size": args.null_size, "seed": 0, "show_progress": False}
    _, maps, s, st = phenotypic_activity(
        meta, X, by=by, negatives=negatives, return_stats=True, **kw
    )
    v = maps["mean_average_precision"].to_numpy()
    lo, hi = _boot(v)
    _, rep = retrieval_map(meta, X, by=by[:1], negatives="others", **kw)
    kind = (
        "unknown" if np.isnan(s["n_negatives_fitted"]) else f"{s['n_negatives_fitted']:.0f} fitted"
    )
    return (
        f"| {name} | {s['n_negatives']:.0f} ({kind}) | {s['mAP']:.3f} [{lo:.3f}, {hi:.3f}] "
        f"(chance {st['chance']:.3f}) | {int(maps['active'].sum())} / {len(maps)} | "
        f"{rep['mean_average_precision'].mean():.3f} |"
    )


def run(name: str, a: ad.AnnData, by: list[str], source: Path, args) -> None:
    base = dataclasses.replace(
        ProfileConfig(), input=(str(source),), controls=CTRL, by=("Metadata_Plate", "Metadata_Well")
    )
    recipe = dataclasses.replace(base, input_state="raw")  # the cellprofiler recipe, forced
    old = process(a.copy(), dataclasses.replace(recipe, fit_controls="all"))
    half = process(a.copy(), recipe)
    default = process(a.copy(), base)
    fit = half.obs[FIT_COLUMN].to_numpy(bool)
    meta = a.obs
    print(f"\n### {name}: {a.n_obs} wells × {a.n_vars} features, {int(fit.sum())} controls fit\n")
    print(
        "| profiles | negatives (of which fitted) | activity mAP [95 % CI] (chance) | active q<0.05 | replicate mAP |"
    )
    print("|---|---|---|---|---|")
    print(row("table as given, all controls", meta, a.X, by, "held_out", args))
    print(row("table as given, held-out controls", meta, a.X, by, "held_out", args, fit=fit))
    print(row("old default: fit all, score all", old.obs, old.X, by, "all", args))
    print(row("fit half, score all (`activity_negatives=all`)", half.obs, half.X, by, "all", args))
    print(
        row(
            "**new default: fit half, score held-out half**", half.obs, half.X, by, "held_out", args
        )
    )
    state = "passed through" if np.array_equal(default.X, a.X) else "recipe ran"
    print(
        row(f"`celldino profile` default ({state})", default.obs, default.X, by, "held_out", args)
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--null-size", type=int, default=10000)
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("celldino").setLevel(logging.ERROR)
    print(f"null_size={args.null_size}, seed 0, bootstrap 2000 over compounds")
    run("LINCS SQ00015054", load(LINCS, "Metadata_pert_id"), ["Metadata_pert_id"], LINCS, args)
    b = load(BBBC, "Metadata_Compound")
    b.obs["Metadata_Treatment"] = b.obs["Metadata_Compound"] + "@" + b.obs["Metadata_Dose"]
    run("BBBC021 odd weeks (raw)", b, ["Metadata_Treatment"], BBBC, args)


if __name__ == "__main__":
    main()
