"""Low-shot curves: the same classifiers trained on 1 % … 100 % of the labelled training set.

One group split fixes the test set; for each fraction the training rows are subsampled per class
(at least one row per class, so that every class can still be predicted) with a recorded seed,
and kNN, the linear probe and the MLP are retrained. This is Cell-DINO's low-shot figure.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from celldino.eval.classify import (
    KS,
    MLPOptions,
    encode_labels,
    knn_f1,
    linear_probe,
    mlp_f1,
    resolve_split,
)
from celldino.eval.spec import profiles_of
from celldino.log import get_logger, progress

if TYPE_CHECKING:
    from anndata import AnnData

logger = get_logger(__name__)

FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.25, 1.0)


def subsample_per_class(
    idx: np.ndarray, y: np.ndarray, *, fraction: float, seed: int
) -> np.ndarray:
    """round(fraction × n_c) rows (at least 1) of each class c; `y` is aligned with `idx`."""
    if not 0 < fraction <= 1:
        raise ValueError(f"low-shot fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return np.sort(idx)
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(y):
        members = idx[y == c]
        n = max(1, int(round(fraction * len(members))))
        keep.append(rng.choice(members, size=n, replace=False))
    return np.sort(np.concatenate(keep))


def lowshot_curve(
    meta: pd.DataFrame | AnnData,
    X=None,
    *,
    label: str,
    fractions: Sequence[float] = FRACTIONS,
    classifiers: Sequence[str] = ("knn", "linear", "mlp"),
    ks: Sequence[int] = KS,
    split_by: str | Sequence[str] | None = None,
    train_idx: np.ndarray | None = None,
    test_idx: np.ndarray | None = None,
    test_size: float = 0.25,
    n_repeats: int = 1,
    mlp_options: MLPOptions | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Tidy table: fraction, repeat, subsample_seed + the classifier columns (macro_f1, …)."""
    meta, X = profiles_of(meta, X)
    unknown = set(classifiers) - {"knn", "linear", "mlp"}
    if unknown:
        raise ValueError(f"unknown classifier(s) {sorted(unknown)}; choose from knn, linear, mlp")
    y, _ = encode_labels(meta, label)
    train, test = resolve_split(
        meta,
        split_by=split_by,
        train_idx=train_idx,
        test_idx=test_idx,
        test_size=test_size,
        seed=seed,
    )
    jobs = [(f, r) for f in fractions for r in range(n_repeats if f < 1 else 1)]
    tables = []
    for fraction, repeat in progress(jobs, desc="low-shot"):
        sub_seed = seed * 1000 + repeat
        sub = subsample_per_class(train, y[train], fraction=fraction, seed=sub_seed)
        common = dict(label=label, train_idx=sub, test_idx=test, seed=seed)
        parts = []
        if "knn" in classifiers:
            parts.append(knn_f1(meta, X, ks=ks, **common))
        if "linear" in classifiers:
            parts.append(linear_probe(meta, X, **common))
        if "mlp" in classifiers:
            parts.append(mlp_f1(meta, X, options=mlp_options, **common))
        t = pd.concat(parts, ignore_index=True)
        t.insert(0, "fraction", fraction)
        t.insert(1, "repeat", repeat)
        t.insert(2, "subsample_seed", sub_seed)
        tables.append(t)
    out = pd.concat(tables, ignore_index=True)
    out["split_by"] = (
        split_by if split_by is None or isinstance(split_by, str) else "+".join(split_by)
    )
    return out
