"""The default profile recipe vs pycytominer's standard workflow, run by pycytominer itself.

Data: the real LINCS plate SQ00015054 (384 wells, 24 DMSO, 454 CellProfiler features) and the
synthetic demo screen (4 plates, 2 batches, 4 MoAs x 2 compounds x 3 doses; engineered CP_
features per well, and learned emb_ per well when --embeddings names an extraction folder).
Pipelines, each on the same per-well table:
- none: the profiles as they are;
- pycytominer: pycytominer.normalize(method='mad_robustize', samples=DMSO) per plate, then
  pycytominer.feature_select with its default operation (variance_threshold);
- pycytominer+: the same with the profiling-recipe operations (variance_threshold,
  correlation_threshold, drop_na_columns, blocklist, drop_outliers);
- celldino: `celldino.pp.recipe.process` with ProfileConfig defaults (profile.recipe=auto);
- celldino variants: the default without sphering, with inverse-normal, and pycytominer parity.
Scores (celldino.eval, copairs' mAP): phenotypic activity vs DMSO (in-sample: the DMSO wells
the pipeline fitted on are the negatives, as usual; held-out: every pipeline fits on half the
DMSO wells of each plate and is scored against the other half, which sphering cannot overfit),
compound retrieval across doses (positives: the same compound at another dose; negatives: other
compounds and DMSO), and on the synthetic screen NSC/NSCB (MoA of the nearest other compound).
Intervals: 95% bootstrap over groups (queries); Δ: paired bootstrap celldino - pycytominer.
Last, an adversarial check reproducing BBBC021's failure: 5 features nearly constant in the
controls (±1e-9) with huge values (~1e3) elsewhere, unrelated to the MoA.

Run: .venv/bin/python bench/profile_recipe.py [--null-size 2000] [--embeddings DIR]
(~10 min on 2 cores; the synthetic screen and its prepare are cached under --work).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import logging
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from celldino.config import PrepareConfig, ProfileConfig, SynthConfig
from celldino.eval.activity import phenotypic_activity
from celldino.eval.map import retrieval_map
from celldino.eval.nsc import nsc_nscb
from celldino.pp.recipe import process

ROOT = Path(__file__).resolve().parents[1]
LINCS = ROOT.parent / "shared/data/lincs_SQ00015054/SQ00015054_normalized_feature_select.csv.gz"
CTRL = "Metadata_pert_type == 'control'"
FIT = "Metadata_fit_control"  # the half of each plate's controls the held-out runs fit on
SYNTH_KEYS = [
    "Metadata_Plate",
    "Metadata_Well",
    "Metadata_Batch",
    "Metadata_Compound",
    "Metadata_Dose",
    "Metadata_MoA",
    "Metadata_pert_type",
]
PYC_RECIPE_OPS = [
    "variance_threshold",
    "correlation_threshold",
    "drop_na_columns",
    "blocklist",
    "drop_outliers",
]


@dataclasses.dataclass
class Data:
    name: str
    adata: ad.AnnData
    cpd: str
    dose: str
    moa: str | None = None
    batch: str | None = None
    activity_by: tuple[str, ...] = ()


def _anndata(meta: pd.DataFrame, X: np.ndarray, feats: list[str]) -> ad.AnnData:
    meta = meta.reset_index(drop=True).copy()
    for c in meta.columns:
        if meta[c].dtype == object or c in ("Metadata_Dose", "Metadata_mmoles_per_liter"):
            meta[c] = meta[c].astype(str)
    a = ad.AnnData(np.asarray(X, dtype=np.float64), obs=meta)
    a.obs_names = [f"w{i}" for i in range(a.n_obs)]
    a.var_names = feats
    return a


def _fit_half(a: ad.AnnData, seed: int = 0) -> None:
    """Mark half of each plate's controls (at random) as the ones the held-out runs fit on."""
    rng = np.random.default_rng(seed)
    fit = np.zeros(a.n_obs, bool)
    ctrl = (a.obs["Metadata_pert_type"] == "control").to_numpy()
    for _, rows in a.obs.groupby("Metadata_Plate", observed=True).indices.items():
        c = rows[ctrl[rows]]
        fit[rng.choice(c, len(c) // 2, replace=False)] = True
    a.obs[FIT] = fit


def lincs() -> Data:
    df = pd.read_csv(LINCS)
    feats = [c for c in df.columns if not c.startswith("Metadata_")]
    meta = df[[c for c in df.columns if c.startswith("Metadata_")]].copy()
    meta["Metadata_pert_id"] = meta["Metadata_pert_id"].fillna("DMSO")
    a = _anndata(meta, df[feats].to_numpy(float), feats)
    return Data(
        "LINCS SQ00015054 (CellProfiler)",
        a,
        "Metadata_pert_id",
        "Metadata_mmoles_per_liter",
        activity_by=("Metadata_pert_id",),
    )


def synthetic(work: Path) -> Path:
    from celldino.data.prepare import prepare
    from celldino.synth import make_screen

    prep = work / "demo_prep"
    if not (prep / "engineered.parquet").exists():
        screen = make_screen(work / "demo_screen", SynthConfig(preset="demo", seed=0))
        prepare(
            PrepareConfig(
                load_data=str(screen / "load_data.csv"),
                out_dir=str(prep),
                crop_size=32,
                cell_channel="AGP",
            )
        )
    return prep / "engineered.parquet"


def per_well(cells: pd.DataFrame, prefix: str, name: str) -> Data:
    """Per-well means of the `prefix` features ('cellprofiler': CellProfiler's compartments, as
    `celldino prepare` names them since issue 12, or the older `CP_` names)."""
    from celldino.pp.presets import is_cellprofiler

    numeric = [c for c in cells.columns if pd.api.types.is_numeric_dtype(cells[c])]
    if prefix == "cellprofiler":
        feats = [c for c in numeric if not c.startswith("Metadata_") and is_cellprofiler(c)]
    else:
        feats = [c for c in numeric if c.startswith(prefix)]
    wells = cells.groupby(SYNTH_KEYS, as_index=False)[feats].mean()
    finite = np.isfinite(wells[feats].to_numpy(float)).all(axis=0)
    if (
        not finite.all()
    ):  # as `celldino profile` (profile.nonfinite=drop_feature), for every pipeline
        print(f"{name}: {int((~finite).sum())} features with NaN/inf dropped before all pipelines")
        feats = [f for f, ok in zip(feats, finite) if ok]
    a = _anndata(wells[SYNTH_KEYS], wells[feats].to_numpy(float), feats)
    return Data(
        name,
        a,
        "Metadata_Compound",
        "Metadata_Dose",
        moa="Metadata_MoA",
        batch="Metadata_Batch",
        activity_by=("Metadata_Compound", "Metadata_Dose"),
    )


# ---- pipelines ------------------------------------------------------------------------------


def pycytominer_workflow(
    a: ad.AnnData, ops, controls: str, fit: np.ndarray | None = None
) -> ad.AnnData:
    """pycytominer.normalize per plate (mad_robustize to `controls`), then feature_select with
    `ops`, decided on the rows `fit` (all when None); features left non-finite are dropped."""
    import pycytominer

    feats = list(a.var_names)
    df = pd.concat(
        [a.obs.reset_index(drop=True), pd.DataFrame(np.asarray(a.X), columns=feats)], axis=1
    )
    parts = [
        pycytominer.normalize(
            g,
            features=feats,
            meta_features=list(a.obs.columns),
            samples=controls,
            method="mad_robustize",
        )
        for _, g in df.groupby("Metadata_Plate")
    ]
    norm = pd.concat(parts).loc[df.index]
    sel = pycytominer.feature_select(
        norm if fit is None else norm[fit], features=feats, operation=ops
    )
    kept = [c for c in sel.columns if c in set(feats)]
    X = norm[kept].to_numpy(float)
    ok = np.isfinite(X).all(axis=0)  # pycytominer can leave inf where a control MAD is 0
    out = ad.AnnData(X[:, ok], obs=a.obs.copy())
    out.var_names = [k for k, good in zip(kept, ok) if good]
    return out


def celldino_recipe(a: ad.AnnData, controls: str, **changes) -> ad.AnnData:
    cfg = dataclasses.replace(ProfileConfig(), controls=controls, **changes)
    return process(a.copy(), cfg)


def pipelines(controls: str) -> dict:
    return {
        "none": lambda a: a.copy(),
        "pycytominer": lambda a: pycytominer_workflow(a, "variance_threshold", controls),
        "pycytominer+": lambda a: pycytominer_workflow(a, PYC_RECIPE_OPS, controls),
        "celldino": lambda a: celldino_recipe(a, controls),
        "celldino sphere=none": lambda a: celldino_recipe(a, controls, sphere="none"),
        "celldino +inverse_normal": lambda a: celldino_recipe(a, controls, inverse_normal=True),
        "celldino parity": lambda a: celldino_recipe(
            a,
            controls,
            normalize="mad_robustize",
            normalize_floor=0.0,
            clip=0.0,
            select=(),
            sphere="none",
        ),
    }


# ---- scores ---------------------------------------------------------------------------------


def _boot(values: np.ndarray, n_boot: int, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n_boot, len(values)))
    means = values[idx].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def scores(d: Data, a: ad.AnnData, args, *, held_out: bool = False) -> dict:
    """Per-group mAP tables (indexed by group) and summary numbers of one pipeline's output."""
    meta = a.obs.reset_index(drop=True)
    X = np.asarray(a.X, dtype=np.float64)
    kw = {"null_size": args.null_size, "seed": 0, "show_progress": False}
    if held_out:  # negatives: the controls the pipeline did not fit on
        keep = ~meta[FIT].to_numpy(bool)
        meta, X = meta[keep].reset_index(drop=True), X[keep]
        _, act, _ = phenotypic_activity(meta, X, by=list(d.activity_by), **kw)
        return {"activity_ho": act.set_index(list(d.activity_by))}
    # in-sample on purpose (the column's name): the controls the pipeline fitted on, too
    _, act, _ = phenotypic_activity(meta, X, by=list(d.activity_by), negatives="all", **kw)
    _, ret = retrieval_map(meta, X, by=[d.cpd], pos_diffby=[d.dose], negatives="others", **kw)
    out = {"activity": act.set_index(list(d.activity_by)), "retrieval": ret.set_index(d.cpd)}
    if d.moa:
        m, _ = nsc_nscb(
            meta, X, moa=d.moa, compound=d.cpd, treatment=[d.cpd, d.dose], batch=d.batch
        )
        out["NSC"], out["NSCB"] = m["NSC"], m["NSCB"]
    return out


def _cell(tab: pd.DataFrame, ref: pd.DataFrame | None, n_boot: int) -> str:
    v = tab["mean_average_precision"].to_numpy()
    lo, hi = _boot(v, n_boot)
    frac = (tab["corrected_p_value"] < 0.05).mean()
    text = f"{v.mean():.3f} [{lo:.3f}, {hi:.3f}] q<.05: {frac:.2f}"
    if ref is not None:
        both = tab.join(ref, rsuffix="_ref", how="inner")
        diff = (both["mean_average_precision"] - both["mean_average_precision_ref"]).to_numpy()
        dlo, dhi = _boot(diff, n_boot, seed=1)
        text += f" Δ {diff.mean():+.3f} [{dlo:+.3f}, {dhi:+.3f}]"
    return text


def run_dataset(d: Data, args) -> None:
    a = d.adata
    _fit_half(a)
    print(f"\n### {d.name}: {a.n_obs} wells × {a.n_vars} features\n")
    cols = ["activity vs DMSO", "activity vs held-out DMSO", "compound retrieval across doses"]
    if d.moa:
        cols += ["NSC", "NSCB"]
    print("| pipeline | features | " + " | ".join(cols) + " |")
    print("|---|---:|" + "---|" * len(cols))
    full, half = pipelines(CTRL), pipelines(f"{CTRL} and {FIT}")
    ref: dict = {}
    for name in full:
        t = time.time()
        try:
            out = full[name](a)
            s = scores(d, out, args)
            s |= scores(d, half[name](a), args, held_out=True)
        except ValueError as e:  # e.g. a pipeline leaving all-zero profiles on a tiny screen
            print(f"| {name} | fails: {str(e).splitlines()[0][:120]} |")
            continue
        if name == "pycytominer":
            ref = s
        cmp_ = name.startswith("celldino")
        row = [
            _cell(s["activity"], ref.get("activity") if cmp_ else None, args.boot),
            _cell(s["activity_ho"], ref.get("activity_ho") if cmp_ else None, args.boot),
            _cell(s["retrieval"], ref.get("retrieval") if cmp_ else None, args.boot),
        ]
        if d.moa:
            row += [f"{s['NSC']:.3f}", f"{s['NSCB']:.3f}"]
        print(
            f"| {name} | {out.n_vars} | " + " | ".join(row) + f" |  <!-- {time.time() - t:.0f}s -->"
        )


def adversarial(d: Data, args) -> None:
    """5 features ~constant in the controls (1e-9 noise) and ~1e3 elsewhere, MoA-free."""
    a = d.adata.copy()
    rng = np.random.default_rng(3)
    ctrl = (a.obs["Metadata_pert_type"] == "control").to_numpy()
    bad = np.where(ctrl[:, None], 1.0, 1.0 + 1e3 * rng.standard_normal((a.n_obs, 5)))
    bad = bad + 1e-9 * rng.standard_normal(bad.shape)
    names = [f"CP_Nuclei_Bad_{i}" for i in range(5)]
    adv = ad.AnnData(np.hstack([np.asarray(a.X), bad]), obs=a.obs.copy())
    adv.var_names = list(a.var_names) + names
    print(f"\n### adversarial: {d.name} + 5 features constant in the controls, ~1e3 elsewhere\n")
    print("| pipeline | NSC clean → adversarial | NSCB clean → adversarial | mean abs Δ cosine |")
    print("|---|---|---|---:|")
    runs = pipelines(CTRL)
    for name in ("pycytominer", "pycytominer+", "celldino parity", "celldino"):
        clean, dirty = runs[name](a), runs[name](adv)
        sc, sd = scores(d, clean, args), scores(d, dirty, args)
        change = float(np.abs(_cosines(clean.X) - _cosines(dirty.X)).mean())
        print(
            f"| {name} | {sc['NSC']:.3f} → {sd['NSC']:.3f} | {sc['NSCB']:.3f} → "
            f"{sd['NSCB']:.3f} | {change:.3f} |"
        )


def _cosines(X) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    X = X / np.linalg.norm(X, axis=1, keepdims=True).clip(1e-300)
    return X @ X.T


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--null-size", type=int, default=2000)
    p.add_argument("--boot", type=int, default=2000)
    p.add_argument("--work", default="/tmp/celldino_profile_recipe")
    p.add_argument("--embeddings", default="", help="an extraction folder of the demo screen")
    p.add_argument("--only", default="", help="lincs, synthetic or embeddings")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("celldino").setLevel(logging.ERROR)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print(f"null_size={args.null_size}, bootstrap={args.boot}, seed 0")
    if args.only in ("", "lincs"):
        run_dataset(lincs(), args)
    if args.only in ("", "synthetic"):
        cells = pd.read_parquet(synthetic(work))
        eng = per_well(cells, "cellprofiler", "synthetic demo screen, engineered (CellProfiler)")
        run_dataset(eng, args)
        adversarial(eng, args)
    if args.embeddings and args.only in ("", "embeddings"):
        files = sorted(glob.glob(str(Path(args.embeddings) / "part-*.parquet")))
        cells = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
        run_dataset(
            per_well(cells, "emb_", f"synthetic demo screen, emb_ ({args.embeddings})"), args
        )


if __name__ == "__main__":
    main()
