"""Train/test splits by group (plate, compound, well) so that no group leaks across the split.

Cells of one well, wells of one compound or of one plate are correlated: a random split by row
lets a classifier recognise the well instead of the phenotype. Every split here keeps each group
on one side, records its seed, and can be written out as a table (`split_table`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupKFold, GroupShuffleSplit

from celldino.eval.spec import NotEvaluable


def group_labels(meta: pd.DataFrame, by: str | Sequence[str]) -> np.ndarray:
    """One string per row naming its group; several columns are joined ('plate1|A01')."""
    cols = [by] if isinstance(by, str) else list(by)
    if not cols:
        raise ValueError("group split needs at least one column in `by` (e.g. 'Metadata_Plate')")
    missing = [c for c in cols if c not in meta.columns]
    if missing:
        raise KeyError(
            f"group column(s) {missing} not in the metadata; available: {list(meta.columns)}"
        )
    for c in cols:
        if meta[c].isna().any():
            rows = list(np.flatnonzero(meta[c].isna().to_numpy())[:5])
            raise ValueError(f"group column '{c}' has missing values (rows {rows}); fill them")
    parts = [meta[c].astype(str).to_numpy() for c in cols]
    out = parts[0].astype(object)
    for p in parts[1:]:
        out = out + "|" + p
    return out.astype(str)


def _two_groups(uniq: np.ndarray, by, what: str) -> None:
    """NotEvaluable (a ValueError: the runner skips the analysis and the report says why) when
    there is one group or none: a one-plate screen cannot hold a plate out."""
    if len(uniq) < 2:
        found = f"found only {str(uniq[0])!r}" if len(uniq) else "found none"
        raise NotEvaluable(
            f"{what} by {by!r} needs at least 2 groups, {found}: nothing can be held out; "
            "set the analysis's split_by to a column with 2 or more values"
        )


def group_split(
    meta: pd.DataFrame,
    *,
    by: str | Sequence[str],
    test_size: float = 0.25,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, test) with every group of `by` wholly on one side."""
    groups = group_labels(meta, by)
    _two_groups(np.unique(groups), by, "group split")
    splitter = GroupShuffleSplit(n_splits=1, test_size=test_size, random_state=seed)
    train, test = next(splitter.split(np.zeros(len(meta)), groups=groups))
    check_no_leakage(meta, train, test, by=by)
    return np.sort(train), np.sort(test)


def group_folds(
    meta: pd.DataFrame,
    *,
    by: str | Sequence[str],
    n_splits: int | None = 5,
    seed: int = 0,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """K folds over groups (leave-one-group-out when n_splits is None); shuffled by `seed`."""
    groups = group_labels(meta, by)
    uniq = np.unique(groups)
    k = len(uniq) if n_splits is None else min(n_splits, len(uniq))
    _two_groups(uniq, by, "cross-validation")
    # GroupKFold is deterministic; relabel the groups with a seeded permutation to shuffle.
    perm = np.random.default_rng(seed).permutation(len(uniq))
    codes = perm[np.searchsorted(uniq, groups)]
    folds = []
    for train, test in GroupKFold(n_splits=k).split(np.zeros(len(meta)), groups=codes):
        check_no_leakage(meta, train, test, by=by)
        folds.append((np.sort(train), np.sort(test)))
    return folds


def check_no_leakage(
    meta: pd.DataFrame, train: np.ndarray, test: np.ndarray, *, by: str | Sequence[str]
) -> None:
    """Raise if any group of `by` has rows on both sides of the split."""
    groups = group_labels(meta, by)
    shared = np.intersect1d(groups[train], groups[test])
    if len(shared):
        raise ValueError(
            f"split leaks {len(shared)} group(s) of {by!r} into both train and test "
            f"(e.g. {list(shared[:3])})"
        )


def split_table(
    meta: pd.DataFrame,
    train: np.ndarray,
    test: np.ndarray,
    *,
    by: str | Sequence[str],
    seed: int,
    fold: int = 0,
) -> pd.DataFrame:
    """Tidy record of a split: row, group, split ('train'/'test'/'unused'), fold, seed."""
    groups = group_labels(meta, by)
    split = np.full(len(meta), "unused", dtype=object)
    split[train] = "train"
    split[test] = "test"
    return pd.DataFrame(
        {
            "row": np.arange(len(meta)),
            "group": groups,
            "split": split,
            "fold": fold,
            "by": "+".join([by] if isinstance(by, str) else list(by)),
            "seed": seed,
        }
    )
