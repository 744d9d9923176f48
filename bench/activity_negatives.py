"""Phenotypic activity against the controls a normalisation/sphering was fitted on, or not.

Issue 21: on the real LINCS plate (384 wells, 24 DMSO, 58 compounds; pycytominer's
mad_robustize + feature selection already applied) the cellprofiler recipe fitted on all 24
DMSO wells and scored against the same 24 called 58 of 58 compounds active, where the table as
pycytominer wrote it gives 31. This prints, per data set, each way of fitting and scoring:

- the table as given, against all its controls (whether it was normalised on them is unknown),
  and against only the controls the split holds out (the same wells as the rows below);
- the 0.3 default: the recipe fitted on every control (`profile.fit_controls=all`), scored
  against the same ones (in-sample);
- the profiles themselves fitted on half of each plate's controls (`profile.fit_controls=half`),
  scored against all controls (`evaluate.activity_negatives=all`) and against the held-out half;
- the default `profile.fit_controls=split`: the profiles (X) fitted on every control, activity
  scored on the `activity` layer (the same steps fitted on half) against the held-out half;
- `celldino profile`'s default on the table (LINCS: recognised as already normalised, passed
  through).

Columns: activity mAP with its chance level (copairs' expected AP of a random ranking, averaged
over compounds) and 95 % bootstrap interval over compounds, the compounds active at BH q < 0.05,
the negatives used, and replicate retrieval (mAP of a compound's wells among all other wells,
as `map_replicate`) to show what the split costs elsewhere. BBBC021 (raw per-well CellProfiler
means, 29 plates × 6 DMSO) as a second, raw screen: treatments are compound × dose, with NSC /
NSCB (the MoA of the nearest other compound's treatment, and from another week) on the
treatments (read on X, the profiles every other analysis reads).

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
from celldino.eval.nsc import nsc_nscb
from celldino.pp.fit_split import ACTIVITY_FIT_COLUMN, ACTIVITY_LAYER, FIT_COLUMN
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


def nsc(meta: pd.DataFrame, X) -> str:
    """NSC / NSCB over BBBC021's treatments (controls out)."""
    meta = meta.reset_index(drop=True)
    keep = (meta["Metadata_pert_type"] != "control").to_numpy()
    m, _ = nsc_nscb(
        meta[keep].reset_index(drop=True),
        np.asarray(X)[keep],
        moa="Metadata_MoA",
        compound="Metadata_Compound",
        treatment=["Metadata_Compound", "Metadata_Dose"],
        batch="Metadata_Batch",
    )
    return f"{m['NSC']:.3f} / {m['NSCB']:.3f}"


def row(name, act, main, by, negatives, args, *, fit=None) -> str:
    """One table row: activity on `act` = (meta, X), replicate mAP and NSC on `main`."""
    meta, X = act[0].reset_index(drop=True).copy(), act[1]
    if fit is not None:  # score the given table against the split's held-out controls
        meta[FIT_COLUMN] = fit
    kw = {"null_size": args.null_size, "seed": 0, "show_progress": False}
    _, maps, s, st = phenotypic_activity(
        meta, X, by=by, negatives=negatives, return_stats=True, **kw
    )
    v = maps["mean_average_precision"].to_numpy()
    lo, hi = _boot(v)
    m_main, X_main = main[0].reset_index(drop=True), main[1]
    _, rep = retrieval_map(m_main, X_main, by=by[:1], negatives="others", **kw)
    kind = (
        "unknown" if np.isnan(s["n_negatives_fitted"]) else f"{s['n_negatives_fitted']:.0f} fitted"
    )
    text = (
        f"| {name} | {s['n_negatives']:.0f} ({kind}) | {s['mAP']:.3f} [{lo:.3f}, {hi:.3f}] "
        f"(chance {st['chance']:.3f}) | {int(maps['active'].sum())} / {len(maps)} | "
        f"{rep['mean_average_precision'].mean():.3f} |"
    )
    return text + (f" {nsc(m_main, X_main)} |" if "Metadata_MoA" in m_main.columns else "")


def _layer(p: ad.AnnData) -> tuple[pd.DataFrame, np.ndarray]:
    """The `activity` layer of a fit_controls=split profile, its fitted half as FIT_COLUMN
    (what `celldino evaluate` scores activity on)."""
    meta = p.obs.reset_index(drop=True).assign(
        **{FIT_COLUMN: p.obs[ACTIVITY_FIT_COLUMN].to_numpy(bool)}
    )
    return meta.drop(columns=[ACTIVITY_FIT_COLUMN]), np.asarray(p.layers[ACTIVITY_LAYER])


def run(name: str, a: ad.AnnData, by: list[str], source: Path, args) -> None:
    base = dataclasses.replace(
        ProfileConfig(), input=(str(source),), controls=CTRL, by=("Metadata_Plate", "Metadata_Well")
    )
    recipe = dataclasses.replace(base, input_state="raw")  # the cellprofiler recipe, forced
    every = process(a.copy(), dataclasses.replace(recipe, fit_controls="all"))
    half = process(a.copy(), dataclasses.replace(recipe, fit_controls="half"))
    split = process(a.copy(), recipe)  # the default fit_controls=split
    default = process(a.copy(), base)
    fit = split.obs[ACTIVITY_FIT_COLUMN].to_numpy(bool)
    print(f"\n### {name}: {a.n_obs} wells × {a.n_vars} features, {int(fit.sum())} controls fit\n")
    moa = "Metadata_MoA" in a.obs.columns
    head = "| profiles | negatives (of which fitted) | activity mAP [95 % CI] (chance) | "
    print(head + "active q<0.05 | replicate mAP |" + (" NSC / NSCB |" if moa else ""))
    print("|---|---|---|---|---|" + ("---|" if moa else ""))
    given = (a.obs, a.X)
    pairs = {k: (v.obs, v.X) for k, v in (("every", every), ("half", half), ("split", split))}
    rows = [
        ("table as given, all controls", given, given, "held_out", None),
        ("table as given, held-out controls", given, given, "held_out", fit),
        (
            "`fit_controls=all`, score all (the 0.3 default)",
            pairs["every"],
            pairs["every"],
            "all",
            None,
        ),
        (
            "`fit_controls=half`, score all (`activity_negatives=all`)",
            pairs["half"],
            pairs["half"],
            "all",
            None,
        ),
        (
            "`fit_controls=half`, score the held-out half",
            pairs["half"],
            pairs["half"],
            "held_out",
            None,
        ),
        (
            "**`fit_controls=split` (default): X on all, activity layer on half, scored on the held-out half**",
            _layer(split),
            pairs["split"],
            "held_out",
            None,
        ),
    ]
    state = "passed through" if np.array_equal(default.X, a.X) else "recipe ran"
    act = _layer(default) if ACTIVITY_LAYER in default.layers else (default.obs, default.X)
    rows.append(
        (f"`celldino profile` default ({state})", act, (default.obs, default.X), "held_out", None)
    )
    for label, act_, main_, negatives, f in rows:
        print(row(label, act_, main_, by, negatives, args, fit=f))


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
