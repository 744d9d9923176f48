"""Phenotypic activity: is a compound's profile distinguishable from the negative controls?

A compound is *active* when its replicates retrieve each other among DMSO wells better than
chance: the mAP of each compound's profiles, with only the controls as negatives, and its
permutation p-value after Benjamini-Hochberg correction (copairs' phenotypic-activity recipe).

**Which controls are the negatives** (`negatives`). Scored against the control wells that the
profiles' normalisation or sphering was fitted on, activity is optimistic (sphering whitens
exactly those wells; on LINCS it called 58 of 58 compounds active where the held-out wells call
far fewer, docs/profiling.md). `celldino profile` fits on half of each plate's controls and
marks them in `Metadata_celldino_fit_control` (`celldino.pp.fit_split`). By default
(`profile.fit_controls=split`) the profiles are fitted on every control and the .h5ad carries a
layer `activity` fitted on half of them: `celldino evaluate` scores activity on that layer, its
fitted half marked as here (eval/runner.py). Here:

- `negatives='held_out'` (the default): the controls marked there are left out and the others
  are the negatives. With every control marked (profiled with `profile.fit_controls=all`)
  there is nothing held out: `NotEvaluable`, naming both ways out.
- `negatives='all'`: every control, also those fitted on; the result is flagged in-sample.

A table without the column (pycytominer's output, any table not written by `celldino profile`)
is scored against all its controls and flagged: whether a normalisation was fitted on them is
unknown. The summary says which: `n_negatives` (controls scored against) and
`n_negatives_fitted` (how many of those a step was fitted on; NaN when unknown).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from celldino.errors import DataError
from celldino.eval.map import BLOCK_BYTES, retrieval_map, summarize
from celldino.eval.spec import NotEvaluable, is_control_row, profiles_of
from celldino.eval.stats import join_flags
from celldino.log import get_logger
from celldino.marks import FIT_COLUMN, fitted_marks

if TYPE_CHECKING:
    from anndata import AnnData

logger = get_logger(__name__)

NEGATIVES = ("held_out", "all")


def choose_negatives(
    meta: pd.DataFrame,
    *,
    control: str,
    control_value: str | Sequence[str] = "control",
    negatives: str = "held_out",
    fit_column: str = FIT_COLUMN,
) -> tuple[np.ndarray, dict]:
    """(rows to keep (n,) bool, what the negatives are): the controls a step was fitted on are
    dropped under `negatives='held_out'`. The dict holds `kind` ('held_out': none of the
    negatives was fitted on; 'fitted': some were; 'unknown': no `fit_column`), `n_negatives`,
    `n_negatives_fitted` (NaN when unknown), `n_left_out` and `flag` (text for the metrics
    table's flags, '' when the negatives are held out)."""
    if negatives not in NEGATIVES:
        raise DataError(
            f"activity negatives={negatives!r}: choose held_out (controls no step was fitted on) "
            "or all (every control, flagged in-sample)"
        )
    ctrl = is_control_row(meta, control, control_value)
    marks = fitted_marks(meta, fit_column)
    n_ctrl = int(ctrl.sum())
    if marks is None:
        flag = (
            f"negatives: all {n_ctrl} controls; whether the profiles' normalisation or sphering "
            f"was fitted on them is unknown (no {fit_column} column: a table not written by "
            "celldino profile), so activity may be optimistic"
        )
        info = {"kind": "unknown", "n_negatives": n_ctrl, "n_negatives_fitted": np.nan}
        return np.ones(len(meta), bool), info | {"n_left_out": 0, "flag": flag}
    fitted = ctrl & marks
    n_fit = int(fitted.sum())
    if negatives == "all" or n_fit == 0:
        flag = (
            f"in-sample: {n_fit} of the {n_ctrl} negative controls fitted the profiles' "
            "normalisation/sphering (activity negatives=all), so activity is optimistic"
            if n_fit
            else ""
        )
        info = {
            "kind": "fitted" if n_fit else "held_out",
            "n_negatives": n_ctrl,
            "n_negatives_fitted": n_fit,
        }
        return np.ones(len(meta), bool), info | {"n_left_out": 0, "flag": flag}
    if n_fit == n_ctrl:
        raise NotEvaluable(
            f"every one of the {n_ctrl} control profiles was used to fit the profiles' "
            f"normalisation/sphering ({fit_column} is True for all), so none is left to score "
            "activity against: evaluate the .h5ad of celldino profile's default "
            "profile.fit_controls=split (its 'activity' layer is fitted on half the controls; "
            "Parquet and CSV cannot hold it), or profile with profile.fit_controls=half, or set "
            "evaluate.activity_negatives=all to score against the fitted controls (in-sample, "
            "flagged)"
        )
    info = {"kind": "held_out", "n_negatives": n_ctrl - n_fit, "n_negatives_fitted": 0}
    return ~fitted, info | {"n_left_out": n_fit, "flag": ""}


def phenotypic_activity(
    meta: pd.DataFrame | AnnData,
    X=None,
    *,
    by: Sequence[str] = ("Metadata_Compound",),
    control: str = "Metadata_pert_type",
    control_value: str = "control",
    negatives: str = "held_out",
    fit_column: str = FIT_COLUMN,
    null_size: int = 10000,
    threshold: float = 0.05,
    seed: int = 0,
    method: str = "auto",
    block_bytes: int = BLOCK_BYTES,
    show_progress: bool = True,
    return_stats: bool = False,
    n_boot: int = 0,
    n_perm: int | None = None,
    what: str = "activity",
):
    """mAP of each `by` group against the controls; returns (AP table, mAP table, summary).

    `negatives`: 'held_out' (default) scores against the controls not marked in `fit_column`
    (the ones `celldino profile` fitted on are left out), 'all' against every control (flagged
    in-sample when some were fitted on); see the module docstring.
    The summary holds `mAP`, `mAP_normalized`, `fraction_retrieved` (here: the fraction of
    groups called active at BH-corrected p < `threshold`), `n_groups`, `n_negatives` and
    `n_negatives_fitted`. With `return_stats`, the mAP table gains each group's chance level
    and interval and a fourth element holds the summary mAP's chance, interval and permutation
    p-value (`retrieval_map`), its `flags` naming in-sample or unknown negatives.
    """
    meta, X = profiles_of(meta, X)
    keep, info = choose_negatives(
        meta,
        control=control,
        control_value=control_value,
        negatives=negatives,
        fit_column=fit_column,
    )
    if not keep.all():
        meta, X = meta[keep].reset_index(drop=True), np.asarray(X)[keep]
    logger.info(
        "%s: negatives are %d control profiles (%s%s)",
        what,
        info["n_negatives"],
        info["kind"].replace("_", "-"),
        f"; {info['n_left_out']} that fitted the normalisation/sphering left out"
        if info["n_left_out"]
        else "",
    )
    if info["flag"]:
        logger.warning("%s: %s", what, info["flag"])
    out = retrieval_map(
        meta,
        X,
        by=by,
        negatives="controls",
        control=control,
        control_value=control_value,
        null_size=null_size,
        threshold=threshold,
        seed=seed,
        method=method,
        block_bytes=block_bytes,
        show_progress=show_progress,
        return_stats=return_stats,
        n_boot=n_boot,
        n_perm=n_perm,
        what=what,
    )
    ap, maps = out[:2]
    summary = summarize(maps, threshold)
    summary |= {"n_negatives": float(info["n_negatives"])}
    summary |= {"n_negatives_fitted": float(info["n_negatives_fitted"])}
    maps = maps.rename(columns={"below_corrected_p": "active"})
    if not return_stats:
        return ap, maps, summary
    st = dict(out[2])
    st["flags"] = join_flags([*str(st.get("flags") or "").split("; "), info["flag"]])
    return ap, maps, summary, st
