"""Phenotypic activity: is a compound's profile distinguishable from the negative controls?

A compound is *active* when its replicates retrieve each other among DMSO wells better than
chance: the mAP of each compound's profiles, with only the controls as negatives, and its
permutation p-value after Benjamini-Hochberg correction (copairs' phenotypic-activity recipe).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from celldino.eval.map import BLOCK_BYTES, retrieval_map, summarize


def phenotypic_activity(
    meta: pd.DataFrame,
    feats: np.ndarray,
    *,
    by: Sequence[str] = ("Metadata_Compound",),
    control_col: str = "Metadata_pert_type",
    control_value: str = "control",
    null_size: int = 10000,
    threshold: float = 0.05,
    seed: int = 0,
    method: str = "auto",
    block_bytes: int = BLOCK_BYTES,
    show_progress: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, float]]:
    """mAP of each `by` group against the controls; returns (AP table, mAP table, summary).

    The summary holds `mAP`, `mAP_normalized`, `fraction_retrieved` (here: the fraction of
    groups called active at BH-corrected p < `threshold`) and `n_groups`.
    """
    ap, maps = retrieval_map(
        meta,
        feats,
        by=by,
        negatives="controls",
        control_col=control_col,
        control_value=control_value,
        null_size=null_size,
        threshold=threshold,
        seed=seed,
        method=method,
        block_bytes=block_bytes,
        show_progress=show_progress,
    )
    summary = summarize(maps, threshold)
    maps = maps.rename(columns={"below_corrected_p": "active"})
    return ap, maps, summary
