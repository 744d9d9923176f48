"""Is an input table already normalised? Then `celldino profile` does not normalise it again.

pycytominer's per-well tables (`<plate>_normalized_feature_select.csv.gz`, the LINCS plate of
the project's data) are normalised, feature-selected and sometimes sphered already; running the
recipe on them normalised and sphered them a second time. The rule, checked on the aggregated
profiles (`already_normalized`), either of:

(a) **names and provenance**: an input's file (or folder) name follows pycytominer's output
    naming (contains `_normalized` or `_spherized`, any case: `_normalized.csv`,
    `_normalized_feature_select.csv.gz`, `_normalized_negcon.parquet`, `_spherized.parquet`),
    or the profiles record celldino's own `normalize` or `sphere` step (`uns`), or carry
    celldino's `Metadata_celldino_fit_control` column with some control marked (the
    Parquet/CSV a `celldino profile` run wrote);
(b) **values**: in every plate (`profile.normalize_by`, else one group) with at least
    `MIN_ROWS` profiles, the controls or all the plate's profiles are centred with unit spread
    in at least `MIN_FRACTION` (90 %) of the features: |median| < 0.1 and 1.4826·MAD in
    [0.5, 2], or |mean| < 0.1 and std in [0.5, 2] (mad_robustize or standardize, to the
    controls or to all wells).

Measured (docs/profiling.md, "Already-normalised input"): the LINCS plate (pycytominer's
mad_robustize to all wells) has all 384 wells' median 0 and MAD 1 in 100 % of its 454 features
(its 24 DMSO wells: 21 % with |median| < 0.1, so the controls alone would miss it); the raw
BBBC021 per-well CellProfiler means reach at most 40 % (controls) on any of their 29 plates.
Per-well means of raw features (CellProfiler or embeddings) have spreads far from 1 across wells.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np

from celldino.marks import FIT_COLUMN, fitted_marks
from celldino.pp.controls import groups
from celldino.pp.steps import CONTROL_COLUMN, steps

CENTER_TOL = 0.1  # |median| (or |mean|) below this counts as centred
SPREAD = (0.5, 2.0)  # 1.4826·MAD (or std) inside this counts as unit spread
MIN_FRACTION = 0.9  # share of features that must look normalised, in every plate
MIN_ROWS = 3  # a reference (a plate's controls, or its profiles) smaller than this is not judged
PYCYTOMINER_NAMES = re.compile(r"_(normalized|spherized)", re.IGNORECASE)


@dataclass(frozen=True)
class InputState:
    """Whether the profiles are already normalised, and the evidence (human-readable)."""

    normalized: bool
    evidence: tuple[str, ...] = field(default_factory=tuple)


def _unit_fraction(X: np.ndarray) -> float:
    """Share of features centred with unit spread: (|median| < 0.1 and 1.4826·MAD in [0.5, 2])
    or (|mean| < 0.1 and std in [0.5, 2])."""
    lo, hi = SPREAD
    med = np.median(X, axis=0)
    mad = 1.4826 * np.median(np.abs(X - med), axis=0)
    mean, std = X.mean(axis=0), X.std(axis=0)
    robust = (np.abs(med) < CENTER_TOL) & (mad >= lo) & (mad <= hi)
    classic = (np.abs(mean) < CENTER_TOL) & (std >= lo) & (std <= hi)
    return float(np.mean(robust | classic))


def value_evidence(adata: ad.AnnData, *, by: str | None = "Metadata_Plate") -> str:
    """Rule (b): '' when the values do not look normalised, else a sentence naming the numbers.
    Controls are those `pp.annotate` marked (none: all profiles only)."""
    X = np.asarray(adata.X, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] == 0 or not np.isfinite(X).all():
        return ""
    ctrl = (
        adata.obs[CONTROL_COLUMN].to_numpy(dtype=bool)
        if CONTROL_COLUMN in adata.obs.columns
        else np.zeros(adata.n_obs, bool)
    )
    key = by if by and by in adata.obs.columns else None
    judged, passed, lowest, which = 0, 0, 1.0, set()
    for _, rows in groups(adata, key):
        refs = {"controls": rows[ctrl[rows]], "all profiles": rows}
        scores = {k: _unit_fraction(X[r]) for k, r in refs.items() if len(r) >= MIN_ROWS}
        if not scores:
            continue
        judged += 1
        name, best = max(scores.items(), key=lambda kv: kv[1])
        lowest = min(lowest, best)
        if best >= MIN_FRACTION:
            passed += 1
            which.add(name)
    if not judged or passed < judged:
        return ""
    return (
        f"in each of the {judged} {key or 'table'} group(s) the {' or '.join(sorted(which))} "
        f"have |median| < {CENTER_TOL} and 1.4826·MAD in [{SPREAD[0]}, {SPREAD[1]}] (or the "
        f"same for mean and std) in at least {lowest:.0%} of the {X.shape[1]} features "
        f"(rule: >= {MIN_FRACTION:.0%})"
    )


def name_evidence(adata: ad.AnnData, sources: Sequence[str] = ()) -> list[str]:
    """Rule (a): pycytominer's output names among `sources`, celldino's own recorded steps, or
    its fit-control marks."""
    found = []
    names = [Path(str(s)).name for s in sources]
    hits = [n for n in names if PYCYTOMINER_NAMES.search(n)]
    if hits:
        found.append(
            f"the input name {hits[0]!r} follows pycytominer's output naming "
            "(_normalized / _spherized)"
        )
    done = [s for s in steps(adata) if s in ("normalize", "sphere")]
    if done:
        found.append(f"the profiles record celldino's {' and '.join(dict.fromkeys(done))} step")
    marks = fitted_marks(adata.obs)
    if marks is not None and marks.any():
        found.append(
            f"{FIT_COLUMN} marks {int(marks.sum())} control(s) a celldino normalisation or "
            "sphering was fitted on"
        )
    return found


def already_normalized(
    adata: ad.AnnData,
    *,
    sources: Sequence[str] = (),
    by: str | None = "Metadata_Plate",
    state: str = "auto",
) -> InputState:
    """Rule (a) or (b) of the module docstring, unless `state` ('raw' / 'normalized', the
    setting profile.input_state) says so."""
    if state == "raw":
        return InputState(False, ("profile.input_state=raw",))
    if state == "normalized":
        return InputState(True, ("profile.input_state=normalized",))
    found = name_evidence(adata, sources)
    values = value_evidence(adata, by=by)
    if values:
        found.append(values)
    return InputState(bool(found), tuple(found))
