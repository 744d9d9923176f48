"""Which negative controls fit the normalisation and sphering, and which are kept out of every fit.

Phenotypic activity (`celldino.eval.activity`) asks whether a compound's wells can be told apart
from the negative controls. Scored against the very control wells a normalisation or sphering
was fitted on, it is optimistic: sphering whitens those wells to the identity, so they sit
tighter around their centre than any other well, and every treatment looks "different from
DMSO". On the real LINCS plate the cellprofiler recipe fitted on all 24 DMSO wells and scored
against the same 24 called 58 of 58 compounds active (mAP 0.899), where the table as pycytominer
wrote it gives 31 of 58 (docs/profiling.md, "Held-out controls").

So `celldino profile` keeps controls out of a fit for activity. By default
(`profile.fit_controls=split`) the profiles themselves (X) are fitted on every control, as the
recipe was chosen (half the controls per plate cost BBBC021's NSCB 0.94 → 0.66 and NSC
0.95 → 0.93 leave-one-week-out: 3 DMSO wells per plate fit the sphering poorly), and the same steps,
on the same features, are fitted a second time on half of each plate's controls into the
layer `activity` (.h5ad only), its fitted controls marked in `Metadata_celldino_activity_fit`;
evaluate's activity scores that layer against the other half. With `profile.fit_controls=half`
X itself is fitted on half: within each value of the split key (the plate,
`profile.normalize_by`), ceil(n/2) controls fit, but at least `MIN_FIT` (3; all of them when the
plate has 3 or fewer: a MAD of 1 or 2 wells is 0 or a single difference), and the rest are held
out. Which ones is fixed
by a hash of the seed and the profile's name (`obs_names`, plate_well for aggregated profiles),
so a well's side does not depend on the table's row order or on the other plates. The fitted
ones are marked True in the bool obs column `Metadata_celldino_fit_control` (every other row
False), which travels into the .h5ad, Parquet and CSV outputs; `celldino evaluate` scores
activity against the controls not marked. `profile.fit_controls=all` fits on every control
(the old behaviour, all marked) and evaluate then refuses activity unless told to score
in-sample (`evaluate.activity_negatives=all`, flagged).
"""

from __future__ import annotations

import math
import zlib

import anndata as ad
import numpy as np

from celldino.errors import DataError
from celldino.marks import ACTIVITY_FIT_COLUMN, ACTIVITY_LAYER, FIT_COLUMN, fitted_marks  # noqa: F401 (re-exported)
from celldino.pp.controls import control_mask, groups
from celldino.pp.steps import record

FIT_MODES = ("split", "half", "all")
FIT_SEED = 0  # fixed: which half fits is part of the recipe, not a tuning knob
MIN_FIT = 3  # a plate's controls fitted at least (all when it has fewer)


def _rank(names: list[str], seed: int) -> np.ndarray:
    """A fixed pseudo-random order of `names` (crc32 of seed:name; ties by name)."""
    keys = [(zlib.crc32(f"{seed}:{n}".encode()), n) for n in names]
    return np.array(sorted(range(len(names)), key=lambda i: keys[i]), dtype=int)


def split_controls(
    adata: ad.AnnData,
    *,
    mode: str = "half",
    by: str | None = "Metadata_Plate",
    seed: int = FIT_SEED,
) -> np.ndarray:
    """The controls (pp.annotate's) the steps fit on: bool (n_obs,). Writes nothing (`mark`
    does, once the caller knows a step will use them).

    mode='half': within each value of obs[`by`] (one group when `by` is empty or not a column),
    max(ceil(n/2), min(n, MIN_FIT)) of its n controls fit, the others are held out; mode='all':
    every control fits.
    """
    if mode not in FIT_MODES:
        raise DataError(f"profile.fit_controls={mode!r}: choose one of {', '.join(FIT_MODES)}")
    controls = control_mask(adata)
    fit = np.zeros(adata.n_obs, dtype=bool)
    key = by if by and by in adata.obs.columns else None
    names = np.asarray(adata.obs_names.astype(str))
    for _, rows in groups(adata, key):
        ctrl = rows[controls[rows]]
        if mode in ("all", "split"):  # split: X on every control (the half is the layer's)
            fit[ctrl] = True
            continue
        order = ctrl[_rank(list(names[ctrl]), seed)]
        n_fit = max(math.ceil(len(ctrl) / 2), min(len(ctrl), MIN_FIT))
        fit[order[:n_fit]] = True
    return fit


def mark(
    adata: ad.AnnData,
    fit: np.ndarray,
    *,
    mode: str,
    by: str | None = "",
    seed: int = FIT_SEED,
    used_by: tuple[str, ...] = (),
) -> None:
    """Write obs[FIT_COLUMN] = `fit` and record the `fit_controls` step (`used_by`: the steps
    fitted on these controls; none: nothing was fitted on a control, `fit` is all False)."""
    fit = np.asarray(fit, dtype=bool)
    controls = control_mask(adata)
    adata.obs[FIT_COLUMN] = fit
    record(
        adata,
        "fit_controls",
        {
            "mode": mode if used_by else "none",
            "by": (by if by and by in adata.obs.columns else "") if used_by else "",
            "seed": seed,
            "used_by": list(used_by),
            "n_fit": int(fit.sum()),
            "n_held_out": int((controls & ~fit).sum()),
            "column": FIT_COLUMN,
        },
    )
