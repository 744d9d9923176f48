"""Profile recipe selection on real BBBC021 CellProfiler profiles, leave one week out.

Data: `../shared/data/bbbc021_profiles/` (the odd weeks: 382 wells, 29 plates, 5 weeks, 71
treatments of 25 compounds in 12 MoAs; the even weeks are kept back for an independent check).
For each held-out week w, every data-dependent step that spans plates (feature selection,
sphering, inverse-normal) is fitted on the other four weeks only; per-plate normalisation uses
each plate's own DMSO wells, as it would for any new plate. Treatment profiles (median, or mean
for the `mean consensus` candidate) of week w are the queries; every odd-week treatment is a
candidate neighbour (cosine). NSC: the nearest treatment of another compound; NSCB: of another
compound and another week. A query whose MoA has no other compound (NSC) or no other week
(NSCB) in the odd weeks cannot be matched by any method and is not scored (15 of 71 treatments
for NSC: Eg5 inhibitors, protein synthesis, epithelial, protein degradation have one compound
here); `NSC (all)` in the table counts them as misses (ceiling 56/71 = 0.789).

Selection: each candidate is scored on every fold with fixed settings (the fold table), and a
nested procedure picks, per outer fold, the candidate with the best inner leave-one-week-out
score ((NSC + NSCB) / 2, pooled) on the four training weeks alone; its outer-fold score is the
honest estimate of choosing by this table. Chance: the mean over queries of the fraction of
allowed neighbours sharing the query's MoA. Intervals: 95 % bootstrap over queries (pooled).

Run: .venv/bin/python bench/profile_lowo.py [--nested] [--only NAME,NAME] [--data TABLE]
(~1 min, with --nested ~6 min on 2 cores; --data another per-well table of the same layout,
e.g. the even weeks kept back, to check the choice with the same command)
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
BBBC021 = ROOT.parent / "shared/data/bbbc021_profiles/bbbc021_per_well_odd_weeks.csv.gz"
META = [
    "Metadata_Plate",
    "Metadata_Well",
    "Metadata_Compound",
    "Metadata_Dose",
    "Metadata_MoA",
    "Metadata_Batch",
    "Metadata_pert_type",
]
TREATMENT = ["Metadata_Compound", "Metadata_Dose", "Metadata_MoA", "Metadata_Batch"]
WEEK, CPD, MOA = "Metadata_Batch", "Metadata_Compound", "Metadata_MoA"


def load(path: Path = BBBC021) -> ad.AnnData:
    """The per-well table as AnnData; every Metadata_ column read as text (doses too)."""
    df = pd.read_csv(path, dtype={c: str for c in META}, keep_default_na=False)
    feats = [c for c in df.columns if not c.startswith("Metadata_")]
    a = ad.AnnData(df[feats].to_numpy(np.float64), obs=df[META].reset_index(drop=True))
    a.obs_names = [f"w{i}" for i in range(a.n_obs)]
    a.var_names = feats
    return a


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One recipe: celldino.pp step settings (ProfileConfig names) or pycytominer's workflow."""

    name: str
    normalize: str = "mad_robustize"
    floor: float = 0.0  # profile.normalize_floor
    floor_reference: str = "all"  # the floor relative to all profiles' or the controls' spread
    select: tuple[str, ...] = ()
    clip: float = 0.0
    sphere: str = "none"
    shrinkage: str | float | None = "oas"
    components: int = 0
    sphere_by: str = ""
    inverse_normal: bool = False
    consensus: str = "median"
    pycytominer: bool = False  # pycytominer.normalize + feature_select(variance_threshold)
    fit_half: bool = False  # fit on half of each plate's controls (profile.fit_controls=half)


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    logging.getLogger("celldino").setLevel(logging.ERROR)


def _pycytominer(a: ad.AnnData, fit: np.ndarray) -> ad.AnnData:
    """pycytominer's arithmetic, run by pycytominer (bench/profile_recipe.py): mad_robustize per
    plate to its DMSO wells, then variance_threshold decided on the training weeks' wells."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from profile_recipe import pycytominer_workflow

    return pycytominer_workflow(a, "variance_threshold", "Metadata_pert_type == 'control'", fit=fit)


def apply(a: ad.AnnData, cand: Candidate, fit: np.ndarray) -> ad.AnnData:
    """Well profiles of `cand`, every cross-plate step fitted on the rows `fit` (bool mask)."""
    from celldino.pp.clip import clip
    from celldino.pp.feature_select import feature_select
    from celldino.pp.inverse_normal import inverse_normal
    from celldino.pp.normalize import normalize
    from celldino.pp.sphere import sphere

    if cand.pycytominer:
        return _pycytominer(a, fit)
    a = a.copy()
    ctrl = (a.obs["Metadata_pert_type"] == "control").to_numpy()
    if cand.fit_half:  # the controls celldino's fit_controls=half fits on, the rest unused
        from celldino.pp.fit_split import split_controls
        from celldino.pp.steps import CONTROL_COLUMN

        a.obs[CONTROL_COLUMN] = ctrl
        ctrl = split_controls(a, mode="half", by="Metadata_Plate")
    if cand.normalize != "none":
        normalize(
            a,
            method=cand.normalize,
            by="Metadata_Plate",
            controls=ctrl,
            scale_floor=cand.floor,
            floor_reference=cand.floor_reference,
        )
    if cand.select:
        keep = feature_select(a[fit].copy(), operations=list(cand.select), copy=True).var_names
        a = a[:, list(keep)].copy()
    if cand.clip > 0:
        clip(a, limit=cand.clip)
    if cand.sphere != "none":
        sphere(
            a,
            method=cand.sphere,
            shrinkage=cand.shrinkage,
            components=cand.components,
            by=cand.sphere_by or None,
            # one sphering per batch is fitted on each batch's own controls (as per-plate
            # normalisation on each plate's); a global one on the training weeks' controls
            controls=ctrl if cand.sphere_by else ctrl & fit,
        )
    if cand.inverse_normal:
        inverse_normal(a)
    return a


def treatments(a: ad.AnnData, how: str = "median") -> ad.AnnData:
    """One profile per treatment (controls dropped), by celldino.pp.consensus."""
    from celldino.pp.consensus import consensus

    trt = a[(a.obs["Metadata_pert_type"] != "control").to_numpy()]
    return consensus(trt, by=TREATMENT, method=how)


def fold_table(t: ad.AnnData) -> pd.DataFrame:
    """Per-query NSC and NSCB outcome over all treatments of `t`, by celldino.eval.nsc
    (queries with no possible match are left out there): columns metric, week, correct,
    chance."""
    from celldino.eval.nsc import nearest_moa

    meta, X = t.obs.reset_index(drop=True), np.asarray(t.X, dtype=np.float64)
    rows = []
    for metric, batch in (("NSC", None), ("NSCB", WEEK)):
        tab = nearest_moa(meta, X, moa=MOA, compound=CPD, batch=batch).table
        # NSCB's table carries the week; NSC's queries are rows of `meta`
        week = tab[WEEK] if batch else meta[WEEK].to_numpy()[tab["query"]]
        rows.append(tab.assign(metric=metric, week=week))
    return pd.concat(rows, ignore_index=True)[["metric", "week", CPD, MOA, "correct", "chance"]]


def score_fold(a: ad.AnnData, cand: Candidate, held_out: str) -> pd.DataFrame:
    """Per-query outcomes of week `held_out`, every cross-plate step fitted on the others."""
    fit = (a.obs[WEEK] != held_out).to_numpy()
    t = treatments(apply(a, cand, fit), cand.consensus)
    tab = fold_table(t)
    return tab[tab["week"] == held_out].assign(fold=held_out)


def lowo(a: ad.AnnData, cand: Candidate, weeks: list[str] | None = None) -> pd.DataFrame:
    """Per-query outcomes of every fold (each week held out once)."""
    weeks = weeks or sorted(a.obs[WEEK].unique())
    return pd.concat([score_fold(a, cand, w) for w in weeks], ignore_index=True)


def summary(tab: pd.DataFrame) -> dict[str, tuple[int, int]]:
    """(correct, queries) per metric and fold, and pooled ('all')."""
    out = {}
    for (metric, fold), g in tab.groupby(["metric", "fold"]):
        out[f"{metric}:{fold}"] = (int(g["correct"].sum()), len(g))
    for metric, g in tab.groupby("metric"):
        out[f"{metric}:all"] = (int(g["correct"].sum()), len(g))
    return out


def _pooled(tab: pd.DataFrame) -> float:
    """The selection criterion: (NSC + NSCB) / 2, each pooled over folds."""
    s = summary(tab)  # a metric without queries (no MoA in two of the weeks) does not count
    parts = [s[f"{m}:all"] for m in ("NSC", "NSCB") if s.get(f"{m}:all", (0, 0))[1]]
    return float(np.mean([hit / n for hit, n in parts]))


def _boot(v: np.ndarray, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n, len(v)))].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


# the `profile.recipe=cellprofiler` preset as of 0.4.0 (pp/presets.py), with a batch column
DEFAULT = Candidate(
    "celldino 0.4.0 default (floor 1 x median control MAD, clip 30, ZCA ratio per week)",
    floor=1.0,
    floor_reference="controls",
    select=("frequency", "drop_na", "drop_outliers", "blocklist"),
    clip=30.0,
    sphere="ZCA",
    shrinkage="ratio",
    sphere_by="Metadata_Batch",
)

PYCYTOMINER = Candidate("pycytominer (mad_robustize + variance_threshold)", pycytominer=True)


def _var(name: str, **kw) -> Candidate:
    """A candidate with pycytominer's plain variance selection (the grid's common base)."""
    return Candidate(name, select=("variance",), **kw)


CANDIDATES = [
    DEFAULT,
    dataclasses.replace(
        DEFAULT, name="the same fitted on half of each plate's controls", fit_half=True
    ),
    dataclasses.replace(
        DEFAULT, name="the same without a batch column (one sphering)", sphere_by=""
    ),
    dataclasses.replace(DEFAULT, name="the same without clipping", clip=0.0),
    dataclasses.replace(DEFAULT, name="the same without the floor (mad, clip 30)", floor=0.0),
    PYCYTOMINER,
    Candidate(
        "celldino 0.3.0 default (floor 1, select, clip 50, ZCA+OAS)",
        floor=1.0,
        select=("frequency", "drop_na", "drop_outliers", "blocklist"),
        clip=50.0,
        sphere="ZCA",
    ),
    Candidate("mad", select=("variance",)),
    Candidate("mad, floor 1 (all profiles)", floor=1.0),
    Candidate("mad, floor 1 (median control spread)", floor=1.0, floor_reference="controls"),
    Candidate("mad, floor 0.5 (median control spread)", floor=0.5, floor_reference="controls"),
    Candidate("standardize", normalize="standardize", select=("variance",)),
    _var("mad, clip 10", clip=10.0),
    _var("mad, clip 20", clip=20.0),
    _var("mad, clip 50", clip=50.0),
    Candidate("standardize, clip 20", normalize="standardize", select=("variance",), clip=20.0),
    Candidate("mad, floor 1, clip 20", floor=1.0, clip=20.0),
    Candidate("mad, clip 20, blocklist", select=("variance", "blocklist"), clip=20.0),
    Candidate("mad, clip 20, correlation 0.9", select=("variance", "correlation"), clip=20.0),
    _var("mad, clip 20, inverse-normal", clip=20.0, inverse_normal=True),
    _var("mad, clip 20, mean consensus", clip=20.0, consensus="mean"),
    _var("mad, clip 20, ZCA OAS", clip=20.0, sphere="ZCA"),
    _var(
        "mad, clip 20, ZCA ratio d/(n+d)",
        clip=20.0,
        sphere="ZCA",
        shrinkage="ratio",
    ),
    _var(
        "mad, clip 20, ZCA shrinkage by CV",
        clip=20.0,
        sphere="ZCA",
        shrinkage="cv",
    ),
    _var(
        "mad, clip 20, ZCA ratio per week",
        clip=20.0,
        sphere="ZCA",
        shrinkage="ratio",
        sphere_by="Metadata_Batch",
    ),
    _var(
        "mad, clip 20, PCA-whiten 40 of ~260 controls",
        clip=20.0,
        sphere="PCA",
        shrinkage=None,
        components=40,
    ),
    _var(
        "mad, clip 20, PCA-whiten 80",
        clip=20.0,
        sphere="PCA",
        shrinkage=None,
        components=80,
    ),
    _var(
        "mad, clip 50, ZCA ratio d/(n+d)",
        clip=50.0,
        sphere="ZCA",
        shrinkage="ratio",
    ),
    _var(
        "mad, clip 30, ZCA ratio d/(n+d)",
        clip=30.0,
        sphere="ZCA",
        shrinkage="ratio",
    ),
    _var("mad, clip 20, ZCA 0.9", clip=20.0, sphere="ZCA", shrinkage=0.9),
    Candidate(
        "mad, floor 1, clip 20, ZCA ratio d/(n+d)",
        floor=1.0,
        clip=20.0,
        sphere="ZCA",
        shrinkage="ratio",
    ),
    Candidate(
        "standardize, clip 20, ZCA ratio d/(n+d)",
        normalize="standardize",
        select=("variance",),
        clip=20.0,
        sphere="ZCA",
        shrinkage="ratio",
    ),
    _var(
        "mad, clip 30, ZCA ratio per week",
        clip=30.0,
        sphere="ZCA",
        shrinkage="ratio",
        sphere_by="Metadata_Batch",
    ),
    _var(
        "mad, clip 20, ZCA ratio per plate",
        clip=20.0,
        sphere="ZCA",
        shrinkage="ratio",
        sphere_by="Metadata_Plate",
    ),
    _var(
        "mad, clip 30, ZCA ratio per plate",
        clip=30.0,
        sphere="ZCA",
        shrinkage="ratio",
        sphere_by="Metadata_Plate",
    ),
    Candidate(
        "mad, floor 0.5 (median control spread), ZCA ratio per week",
        floor=0.5,
        floor_reference="controls",
        sphere="ZCA",
        shrinkage="ratio",
        sphere_by="Metadata_Batch",
    ),
    _var(
        "mad, clip 10, ZCA ratio d/(n+d)",
        clip=10.0,
        sphere="ZCA",
        shrinkage="ratio",
    ),
]


def _fmt(c: tuple[int, int]) -> str:
    return f"{c[0]}/{c[1]}" if c[1] else "–"


def fold_rows(a: ad.AnnData, cands: list[Candidate]) -> dict[str, pd.DataFrame]:
    weeks = sorted(a.obs[WEEK].unique())
    print("\n### Leave-one-week-out, BBBC021 odd weeks (correct/queries per held-out week)\n")
    head = " | ".join(w.replace("Week", "W") for w in weeks)
    print(
        f"| candidate | NSC {head} | NSC pooled [95% CI] | NSC (all) | NSCB {head} | "
        "NSCB pooled [95% CI] |"
    )
    print("|---|" + "---:|" * (2 * len(weeks) + 4))
    tabs = {}
    trt = a.obs.loc[a.obs["Metadata_pert_type"] != "control", TREATMENT]
    n_treatments = len(trt.drop_duplicates())
    for cand in cands:
        t0 = time.time()
        tab = lowo(a, cand, weeks)
        tabs[cand.name] = tab
        s = summary(tab)
        cells = []
        for m in ("NSC", "NSCB"):
            per = [_fmt(s.get(f"{m}:{w}", (0, 0))) for w in weeks]
            v = tab[tab["metric"] == m]["correct"].to_numpy(float)
            lo, hi = _boot(v)
            cells += per + [f"{v.mean():.3f} [{lo:.3f}, {hi:.3f}]"]
            if m == "NSC":
                cells.append(f"{s['NSC:all'][0] / n_treatments:.3f}")
        print(f"| {cand.name} | " + " | ".join(cells) + f" |  <!-- {time.time() - t0:.0f}s -->")
    chance = tabs[cands[0].name].groupby("metric")["chance"].mean()
    print(f"\nchance (mean over queries): NSC {chance['NSC']:.3f}, NSCB {chance['NSCB']:.3f}")
    return tabs


def nested(a: ad.AnnData, cands: list[Candidate]) -> None:
    """Per outer fold: choose the candidate by inner leave-one-week-out on the training weeks,
    then score it on the held-out week."""
    weeks = sorted(a.obs[WEEK].unique())
    print("\n### Nested selection: chosen on four weeks, scored on the fifth\n")
    print("| held-out week | chosen (inner score) | NSC | NSCB |")
    print("|---|---|---:|---:|")
    rows = []
    for w in weeks:
        inner_a = a[(a.obs[WEEK] != w).to_numpy()].copy()
        inner = {c.name: _pooled(lowo(inner_a, c)) for c in cands}
        best = max(cands, key=lambda c: inner[c.name])  # ties: the earlier (simpler) one
        tab = score_fold(a, best, w)
        rows.append(tab)
        s = summary(tab)
        print(
            f"| {w} | {best.name} ({inner[best.name]:.3f}) | {_fmt(s.get(f'NSC:{w}', (0, 0)))} | "
            f"{_fmt(s.get(f'NSCB:{w}', (0, 0)))} |"
        )
    tab = pd.concat(rows, ignore_index=True)
    s = summary(tab)
    print(
        f"| pooled | | {s['NSC:all'][0] / s['NSC:all'][1]:.3f} | "
        f"{s['NSCB:all'][0] / s['NSCB:all'][1]:.3f} |"
    )


def with_fewer_controls(a: ad.AnnData, keep: int, seed: int) -> ad.AnnData:
    """The wells of `a` with only `keep` random control wells per plate (the others removed),
    as if each plate had been run with fewer DMSO wells."""
    rng = np.random.default_rng(seed)
    ctrl = (a.obs["Metadata_pert_type"] == "control").to_numpy()
    drop = np.zeros(a.n_obs, bool)
    for _, rows in a.obs.groupby("Metadata_Plate", observed=True).indices.items():
        c = rows[ctrl[rows]]
        drop[rng.choice(c, max(len(c) - keep, 0), replace=False)] = True
    return a[~drop].copy()


def fewer_controls(a: ad.AnnData, cands: list[Candidate], keeps=(5, 4), seeds: int = 4) -> None:
    """How much each candidate depends on which DMSO wells it is fitted on: pooled NSC / NSCB
    with only k control wells per plate (random draws), every fold as above."""
    print("\n### Fewer DMSO wells per plate (pooled NSC / NSCB, mean [min, max] over draws)\n")
    print("| candidate | " + " | ".join(f"{k} of 6 per plate" for k in keeps) + " |")
    print("|---|" + "---|" * len(keeps))
    for cand in cands:
        cells = []
        for keep in keeps:
            r = []
            for seed in range(seeds):
                s = summary(lowo(with_fewer_controls(a, keep, seed), cand))
                r.append([s[f"{m}:all"][0] / s[f"{m}:all"][1] for m in ("NSC", "NSCB")])
            r = np.array(r)
            cells.append(
                " / ".join(
                    f"{r[:, j].mean():.3f} [{r[:, j].min():.3f}, {r[:, j].max():.3f}]"
                    for j in (0, 1)
                )
            )
        print(f"| {cand.name} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nested", action="store_true", help="also the nested selection (slower)")
    p.add_argument("--only", default="", help="comma-separated candidate name prefixes")
    p.add_argument(
        "--fewer-controls",
        action="store_true",
        help="also the first candidates with 5 and 4 DMSO wells per plate (4 draws each)",
    )
    p.add_argument(
        "--data",
        default=str(BBBC021),
        help="a per-well table of the same layout (e.g. the even weeks, for the held-out check)",
    )
    args = p.parse_args()
    _quiet()
    a = load(Path(args.data))
    cands = CANDIDATES
    if args.only:
        keys = [k.strip() for k in args.only.split(",")]
        cands = [c for c in CANDIDATES if any(c.name.startswith(k) for k in keys)]
    print(f"{a.n_obs} wells × {a.n_vars} features, {a.obs['Metadata_Plate'].nunique()} plates")
    fold_rows(a, cands)
    if args.nested:
        nested(a, cands)
    if args.fewer_controls:
        fewer_controls(a, [c for c in cands if not c.fit_half][:4] + [PYCYTOMINER])


if __name__ == "__main__":
    main()
