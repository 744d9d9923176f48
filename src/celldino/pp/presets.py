"""Named profile recipes (`profile.recipe`): validated step settings for a kind of feature.

A preset fills every step setting the user left unset ('' for strings, a negative number for
`normalize_floor` and `clip`, `recipe` inside `profile.select`); an explicit setting always wins.
`auto` picks `cellprofiler` for CellProfiler measurements (names starting with a CellProfiler
compartment `Cells_`, `Cytoplasm_`, `Nuclei_`, `Image_`, or celldino's engineered `CP_`) and
`embeddings` for everything else (learned features, `emb_`).

Why each step. The `cellprofiler` preset was chosen leave-one-week-out on real data: BBBC021's
per-well CellProfiler profiles, odd weeks (`bench/profile_lowo.py`, docs/profiling.md "How the
cellprofiler preset was chosen"; every fold there). Each held-out week's treatments are scored
(NSC/NSCB) with every cross-plate step fitted on the other four weeks. It beats or matches
pycytominer's workflow on every fold (NSC 53/56 vs 36/56 pooled, NSCB 30/32 vs 29/32); choosing
among all 37 candidates inside each fold's training weeks gives 0.857 / 0.938 on the held-out
weeks. The synthetic screen only checks the code (its ground truth), it does not choose.
- normalise per plate to its controls (median, 1.4826·MAD), each feature's scale at least the
  median over plates of its control MAD (`normalize_floor_reference=controls`): with six DMSO
  wells a plate's MAD is often near 0 by chance, and pycytominer's arithmetic then divides by it
  (NSC 0.643). Without this floor clipping reached the same folds but fell to NSC 0.83 / NSCB
  0.84-0.88 with 5 or 4 DMSO wells per plate (which wells were DMSO decided it); with it
  0.94-0.96 / 0.90-0.94. The 0.3.0 floor on all the plate's wells replaced control-based
  scaling almost everywhere and cost NSCB (0.688 vs 0.906).
- clip at ±30 control spreads: a guard against one artefactual well; with the floor it changes
  one query either way (docs/profiling.md).
- CellProfiler selection: pycytominer's variance rule (`frequency`), `drop_na`,
  `drop_outliers` and its blocklist (the same scores as `variance` alone or none: kept as the
  field's standard hygiene). No `correlation`: it cost NSCB (0.781 → 0.656).
- ZCA sphering on the controls with the covariance shrunk toward the mean eigenvalue by
  a = d / (n + d) for n control profiles and d features ('ratio'): half-way with as many
  controls as features, more with fewer. OAS chose a ≈ 0.01 (whitening noise directions: NSC
  0.786 at ±20) and cross-validated likelihood as little; PCA-whitening of the 40 or 80 leading
  directions was between. One sphering per batch (`Metadata_Batch` when present, each batch's
  own controls; as per-plate normalisation uses each plate's) took NSC from 0.929 to 0.964 at
  ±20; without a batch column one global sphering (with the floor: NSC 0.929 / NSCB 0.906,
  still at or above pycytominer on every fold).
- Embeddings: no sphering, standardise, floor 1, clip 50, unchanged: there is no real screen
  of embeddings with MoA labels here to choose on. On the synthetic demo screen (`make demo`,
  32 DMSO wells, 192 dimensions) ZCA+OAS took the learned embeddings' NSCB from 0.542 to 0.375
  and random init's from 0.604 to 0.333. `profile.sphere=ZCA` turns it on.
- no inverse-normal transform: it cost NSCB on BBBC021 (0.781 → 0.688 at ±20); available with
  `profile.inverse_normal=true`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from celldino.config import ProfileConfig
from celldino.errors import DataError

RECIPES = ("auto", "cellprofiler", "embeddings", "none")
CELLPROFILER_PREFIXES = ("Cells_", "Cytoplasm_", "Nuclei_", "Image_")
SHRINKAGES = ("oas", "ledoit_wolf", "ratio", "cv")  # estimators of profile.sphere_shrinkage


@dataclass(frozen=True)
class Steps:
    """The resolved step settings of one `celldino profile` run."""

    recipe: str  # the preset used (auto resolved)
    normalize: str
    normalize_floor: float
    normalize_floor_reference: str  # the floor is x the spread of: all (group's wells) or controls
    clip: float  # 0 = no clipping
    select: tuple[str, ...]
    sphere: str
    sphere_shrinkage: str | float | None  # None = pycytominer's epsilon estimator
    sphere_components: int  # 0 = whiten every direction
    sphere_by: str  # one sphering per value of this column ('' = one over all profiles)
    inverse_normal: bool


PRESETS: dict[str, dict] = {
    "cellprofiler": {  # chosen leave-one-week-out on real BBBC021 profiles (module docstring)
        "normalize": "mad_robustize",
        "normalize_floor": 1.0,
        "normalize_floor_reference": "controls",
        "clip": 30.0,
        "select": ("frequency", "drop_na", "drop_outliers", "blocklist"),
        "sphere": "ZCA",
        "sphere_shrinkage": "ratio",
        "sphere_components": 0,
        "sphere_by": ("Metadata_Batch",),  # the first present; none present: global
    },
    "embeddings": {
        "normalize": "standardize",
        "normalize_floor": 1.0,
        "normalize_floor_reference": "all",
        "clip": 50.0,
        "select": (),
        "sphere": "none",  # measured: ZCA cost NSCB on the demo's embeddings (module docstring)
        "sphere_shrinkage": "oas",
        "sphere_components": 0,
        "sphere_by": (),
    },
    "none": {
        "normalize": "none",
        "normalize_floor": 1.0,
        "normalize_floor_reference": "all",
        "clip": 0.0,
        "select": (),
        "sphere": "none",
        "sphere_shrinkage": "oas",
        "sphere_components": 0,
        "sphere_by": (),
    },
}


def is_cellprofiler(name: str) -> bool:
    """A CellProfiler measurement name (optionally behind celldino's engineered `CP_`)."""
    name = name[3:] if name.startswith("CP_") else name
    return name.startswith(CELLPROFILER_PREFIXES)


def pick(features: Sequence[str]) -> str:
    """`auto`: cellprofiler when most feature names are CellProfiler measurements."""
    names = [str(f) for f in features]
    n = sum(map(is_cellprofiler, names))
    return "cellprofiler" if names and n * 2 > len(names) else "embeddings"


def _shrinkage(text: str) -> str | float | None:
    if text == "none":
        return None
    if text in SHRINKAGES:
        return text
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1:
        raise DataError(
            f"profile.sphere_shrinkage={text!r}: choose {', '.join(SHRINKAGES)}, none or a number "
            "in [0, 1]"
        )
    return value


def _sphere_by(cfg: ProfileConfig, preset: dict, columns: Sequence[str]) -> str:
    """profile.sphere_by: as set ('global' = ''), or the preset's first column present."""
    if cfg.sphere_by:
        return "" if cfg.sphere_by == "global" else cfg.sphere_by
    return next((c for c in preset["sphere_by"] if c in set(map(str, columns))), "")


def resolve(
    cfg: ProfileConfig,
    features: Sequence[str],
    *,
    has_controls: bool = True,
    columns: Sequence[str] = (),
) -> Steps:
    """The step settings of `cfg` with the unset ones taken from its recipe; `columns` are the
    metadata columns (the recipe spheres per batch when there is a batch column)."""
    if cfg.recipe not in RECIPES:
        raise DataError(f"profile.recipe={cfg.recipe!r}: choose one of {', '.join(RECIPES)}")
    name = pick(features) if cfg.recipe == "auto" else cfg.recipe
    preset = PRESETS[name]
    select: list[str] = []
    for op in cfg.select:
        select += list(preset["select"]) if op == "recipe" else [op]
    sphere = cfg.sphere or preset["sphere"]
    if not cfg.sphere and not has_controls:
        sphere = "none"  # the preset's sphering needs controls; an explicit one is refused
    return Steps(
        recipe=name,
        normalize=cfg.normalize or preset["normalize"],
        normalize_floor=(
            cfg.normalize_floor if cfg.normalize_floor >= 0 else preset["normalize_floor"]
        ),
        normalize_floor_reference=(
            cfg.normalize_floor_reference or preset["normalize_floor_reference"]
        ),
        clip=cfg.clip if cfg.clip >= 0 else preset["clip"],
        select=tuple(dict.fromkeys(select)),
        sphere=sphere,
        sphere_shrinkage=_shrinkage(cfg.sphere_shrinkage or preset["sphere_shrinkage"]),
        sphere_components=(
            cfg.sphere_components if cfg.sphere_components >= 0 else preset["sphere_components"]
        ),
        sphere_by=_sphere_by(cfg, preset, columns),
        inverse_normal=cfg.inverse_normal,
    )
