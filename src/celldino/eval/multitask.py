"""Multi-task activity prediction from profiles with a sparse label matrix.

Assay read-outs (one column per task: 1 active, 0 inactive, missing = not measured) are predicted
from profiles by one network with a shared trunk and one logit per task, trained with binary
cross-entropy masked to the measured entries. Profiles are split by group (compound, usually)
and each task is scored by ROC-AUC on its measured test entries; the summary counts tasks whose
AUC reaches a threshold (0.9 in Moshkov et al.'s assay-prediction study).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from scipy.stats import rankdata
from torch import nn

from celldino.eval.classify import MLPClassifier, as_matrix, zscore_fit
from celldino.eval.spec import profiles_of
from celldino.eval.splits import group_split
from celldino.log import get_logger

if TYPE_CHECKING:
    from anndata import AnnData

logger = get_logger(__name__)


def roc_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """ROC-AUC as the Mann–Whitney U statistic (ties count one half); NaN with one class."""
    y = np.asarray(y_true).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)  # average ranks for ties
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def masked_bce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean BCE-with-logits over the entries where `mask` is true.  All (B, T)."""
    loss = nn.functional.binary_cross_entropy_with_logits(
        logits, targets, reduction="none"
    )  # (B, T)
    m = mask.to(loss.dtype)
    return (loss * m).sum() / m.sum().clamp_min(1.0)


def label_matrix(meta: pd.DataFrame, tasks: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Targets (n, T) with missing set to 0, and the measured mask (n, T); checks values are 0/1."""
    missing = [c for c in tasks if c not in meta.columns]
    if missing:
        raise KeyError(f"task column(s) {missing} not in the metadata")
    if not tasks:
        raise ValueError("multi-task prediction needs at least one task column")
    L = meta[list(tasks)].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    mask = ~np.isnan(L)
    bad = mask & ~np.isin(L, (0.0, 1.0))
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise ValueError(
            f"task '{tasks[c]}' row {r} has label {L[r, c]}; use 1 (active), 0 (inactive) "
            "or leave empty (not measured)"
        )
    return np.nan_to_num(L).astype(np.float32), mask


def multitask_activity(
    meta: pd.DataFrame | AnnData,
    X=None,
    *,
    tasks: Sequence[str],
    split_by: str | Sequence[str] = "Metadata_Compound",
    test_size: float = 0.25,
    hidden: Sequence[int] = (512, 256),
    dropout: float = 0.5,
    epochs: int = 50,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    threshold: float = 0.9,
    seed: int = 0,
) -> tuple[pd.DataFrame, dict]:
    """Train on a group split with masked BCE; ROC-AUC per task on the held-out groups.

    Returns the per-task table (task, auc, n_train_measured, n_test_pos, n_test_neg) and a
    summary with the count and fraction of scorable tasks whose AUC ≥ `threshold`.
    """
    meta, X = profiles_of(meta, X)
    X = as_matrix(X, len(meta))
    L, M = label_matrix(meta, tasks)
    train, test = group_split(meta, by=split_by, test_size=test_size, seed=seed)
    mean, std = zscore_fit(X[train])
    xtr = torch.from_numpy(((X[train] - mean) / std).astype(np.float32))
    ytr, mtr = torch.from_numpy(L[train]), torch.from_numpy(M[train])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        model = MLPClassifier(X.shape[1], len(tasks), hidden, dropout).train()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        steps = epochs * max(1, int(np.ceil(len(train) / batch_size)))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        for _ in range(epochs):
            perm = torch.randperm(len(train), generator=gen)
            for s in range(0, len(perm), batch_size):
                b = perm[s : s + batch_size]
                loss = masked_bce(model(xtr[b]), ytr[b], mtr[b])  # (B, T) → scalar
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        model.eval()
        with torch.no_grad():
            xte = torch.from_numpy(((X[test] - mean) / std).astype(np.float32))
            scores = model(xte).numpy()  # (n_test, T) logits; AUC is rank-based
    rows = []
    for j, task in enumerate(tasks):
        m = M[test, j]
        y = L[test, j][m]
        rows.append(
            {
                "task": task,
                "auc": roc_auc(y, scores[m, j]),
                "n_train_measured": int(M[train, j].sum()),
                "n_test_pos": int((y == 1).sum()),
                "n_test_neg": int((y == 0).sum()),
                "seed": seed,
            }
        )
    table = pd.DataFrame(rows)
    scorable = table.auc.notna()
    n_above = int((table.auc[scorable] >= threshold).sum())
    summary = {
        "n_tasks": len(tasks),
        "n_scorable": int(scorable.sum()),
        "threshold": threshold,
        "n_tasks_above": n_above,
        "fraction_above": n_above / max(1, int(scorable.sum())),
        "median_auc": float(table.auc[scorable].median()) if scorable.any() else float("nan"),
        "n_train": int(len(train)),
        "n_test": int(len(test)),
        "split_by": split_by if isinstance(split_by, str) else "+".join(split_by),
        "seed": seed,
    }
    return table, summary
