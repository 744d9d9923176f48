"""Phenotypic activity: is a compound's profile distinguishable from the negative controls?

A compound is *active* when its replicates retrieve each other among DMSO wells better than
chance: the mAP of each compound's profiles, with only the controls as negatives, and its
permutation p-value after Benjamini-Hochberg correction (copairs' phenotypic-activity recipe).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import pandas as pd

from celldino.eval.map import BLOCK_BYTES, retrieval_map, summarize
from celldino.eval.spec import profiles_of

if TYPE_CHECKING:
    from anndata import AnnData


def phenotypic_activity(
    meta: pd.DataFrame | AnnData,
    X=None,
    *,
    by: Sequence[str] = ("Metadata_Compound",),
    control: str = "Metadata_pert_type",
    control_value: str = "control",
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

    The summary holds `mAP`, `mAP_normalized`, `fraction_retrieved` (here: the fraction of
    groups called active at BH-corrected p < `threshold`) and `n_groups`. With `return_stats`,
    the mAP table gains each group's chance level and interval and a fourth element holds the
    summary mAP's chance, interval and permutation p-value (`retrieval_map`).
    """
    meta, X = profiles_of(meta, X)
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
    maps = maps.rename(columns={"below_corrected_p": "active"})
    return (ap, maps, summary, out[2]) if return_stats else (ap, maps, summary)
