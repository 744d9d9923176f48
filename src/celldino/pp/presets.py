"""Named profile recipes (`profile.recipe`): validated step settings for a kind of feature.

A preset fills every step setting the user left unset ('' for strings, a negative number for
`normalize_floor` and `clip`, `recipe` inside `profile.select`); an explicit setting always wins.
`auto` picks `cellprofiler` for CellProfiler measurements (names starting with a CellProfiler
compartment `Cells_`, `Cytoplasm_`, `Nuclei_`, `Image_`, or celldino's engineered `CP_`) and
`embeddings` for everything else (learned features, `emb_`).

Why each step (measured in docs/validation.md, "Profile recipe"; reasons, not fitted constants):
- normalise per plate to the controls, each feature's scale at least its spread over all the
  plate's profiles (pp.normalize, scale_floor=1): a feature cannot explode when the controls
  happen not to vary in it; CellProfiler features are heavy-tailed (median/MAD, as pycytominer),
  embedding dimensions are not (mean/std).
- CellProfiler selection: pycytominer's variance rule (`frequency`: near-constant and
  few-valued features), `drop_na`, `drop_outliers` and its blocklist of known-noisy features.
  No `correlation` selection: sphering decorrelates the features instead of discarding the
  redundant ones (their average is less noisy than any one of them); it cost NSC on the
  synthetic screen. Embedding dimensions have no such catalogue: none.
- clip at ±50 control spreads: a single artefactual well cannot dominate a cosine.
- CellProfiler features: ZCA sphering on the controls, fitted once over all plates, with OAS
  shrinkage toward the mean eigenvalue (typical variation normalisation): raises NSC/NSCB and
  retrieval on LINCS and the synthetic screen; the shrinkage keeps it safe with fewer controls
  than features.
- Embeddings: no sphering. After per-plate centring the controls hold no batch variance, so
  whitening on them magnifies every direction that is quiet in the controls, batch x treatment
  interactions included; learned (and random-init) embeddings carry much more of that than
  engineered features. On the demo screen (`make demo`, 32 DMSO wells, 192 dimensions) ZCA+OAS
  took the learned embeddings' NSCB from 0.542 to 0.375 and random init's from 0.604 to 0.333
  (NSC 0.708 -> 0.792 and 0.583 -> 0.667), while the engineered features kept NSCB 0.854.
  `profile.sphere=ZCA` (with `sphere_by` a batch key when there are enough controls per batch)
  turns it on.
- no inverse-normal transform: it cost NSCB on the synthetic screen (0.79 → 0.60); available
  with `profile.inverse_normal=true`.
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
        "normalize_floor": 0.0,
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
