"""Clip normalised profiles to [-limit, limit] (a last guard against a few extreme values).

After normalisation to the controls, a value of 50 means 50 control spreads from the controls'
centre: far outside anything the controls show, so its exact size carries little more. Without
clipping, one such feature can outweigh hundreds of others in a cosine similarity. np.clip.
"""

from __future__ import annotations

import anndata as ad
import numpy as np

from celldino.errors import DataError
from celldino.log import get_logger
from celldino.pp.steps import record

logger = get_logger(__name__)


def clip(adata: ad.AnnData, *, limit: float = 50.0, copy: bool = False) -> ad.AnnData | None:
    """Clip every value of X to [-limit, limit] and record how many were clipped.

    Modifies `adata` and returns None; copy=True returns a clipped copy instead.
    """
    if not limit > 0:
        raise DataError(f"clip limit must be > 0, got {limit}")
    adata = adata.copy() if copy else adata
    X = np.asarray(adata.X, dtype=np.float64)
    n = int((np.abs(X) > limit).sum())
    adata.X = np.clip(X, -limit, limit)
    if n:
        logger.info("clip: %d of %d values beyond ±%g clipped", n, X.size, limit)
    record(adata, "clip", {"limit": limit, "n_clipped": n})
    return adata if copy else None
