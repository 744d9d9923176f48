"""Similarity of aggregated groups, the Mantel test between two matrices, CCA cross-modal matching.

- `group_similarity`: profiles averaged per group (e.g. MoA or compound), cosine (or Pearson)
  similarity between groups, rows and columns in hierarchical-clustering order.
- `mantel_test`: correlation between the upper triangles of two distance/similarity matrices
  over the same objects, with a p-value from permuting the objects of one matrix.
- `cca_matching`: canonical correlation analysis between two modalities measured on the same
  samples (e.g. image embeddings and gene expression); on held-out pairs, the fraction of samples
  whose nearest neighbour in the other modality (in the shared space) is their own partner.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy.cluster.hierarchy import leaves_list, linkage
from scipy.spatial.distance import squareform
from scipy.stats import rankdata
from sklearn.cross_decomposition import CCA

from celldino.eval.classify import as_matrix, resolve_split
from celldino.eval.spec import profiles_of

if TYPE_CHECKING:
    from anndata import AnnData


def group_similarity(
    meta: pd.DataFrame | AnnData,
    X=None,
    *,
    group: str,
    metric: str = "cosine",
    method: str = "average",
    order: bool = True,
) -> pd.DataFrame:
    """Square DataFrame of similarities between group means, in hierarchical-clustering order.

    The linkage (scipy, `method`, optimal leaf ordering) runs on 1 − similarity; the order is
    also stored in `result.attrs["order"]` and the linkage matrix in `result.attrs["linkage"]`.
    """
    meta, X = profiles_of(meta, X)
    if metric not in ("cosine", "pearson"):
        raise ValueError(f"metric must be 'cosine' or 'pearson', got {metric!r}")
    if group not in meta.columns:
        raise KeyError(f"group column '{group}' not in the metadata: {list(meta.columns)}")
    X = as_matrix(X, len(meta))
    groups = meta[group].astype(str).to_numpy()
    names, inv = np.unique(groups, return_inverse=True)
    means = np.zeros((len(names), X.shape[1]))
    np.add.at(means, inv, X)
    means /= np.bincount(inv)[:, None]
    if metric == "pearson":
        means = means - means.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(means, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    unit = means / norms
    sim = np.clip(unit @ unit.T, -1.0, 1.0)
    np.fill_diagonal(sim, 1.0)
    idx = np.arange(len(names))
    Z = None
    if order and len(names) > 2:
        dist = squareform(1.0 - sim, checks=False)
        Z = linkage(np.clip(dist, 0, None), method=method, optimal_ordering=True)
        idx = leaves_list(Z)
    out = pd.DataFrame(sim[np.ix_(idx, idx)], index=names[idx], columns=names[idx])
    out.index.name = group
    out.attrs["order"] = names[idx].tolist()
    out.attrs["linkage"] = None if Z is None else Z.tolist()
    out.attrs["metric"] = metric
    return out


def _upper(M: np.ndarray) -> np.ndarray:
    return M[np.triu_indices(len(M), k=1)]


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def mantel_test(
    A,
    B,
    *,
    method: str = "pearson",
    n_permutations: int = 999,
    alternative: str = "greater",
    seed: int = 0,
) -> dict:
    """Mantel test between two symmetric (n, n) matrices over the same, equally ordered objects.

    r is the Pearson (or Spearman) correlation of the upper triangles; the p-value is
    (1 + #{r_perm ≥ r}) / (1 + n_permutations) with rows and columns of B permuted together
    (`alternative='two-sided'` compares |r|). `null_mean` and `null_q95` summarise the
    permutation null (the r a matrix unrelated to A reaches by chance).
    """
    A = np.asarray(A.to_numpy() if isinstance(A, pd.DataFrame) else A, dtype=np.float64)
    B = np.asarray(B.to_numpy() if isinstance(B, pd.DataFrame) else B, dtype=np.float64)
    if A.shape != B.shape or A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(
            f"Mantel test needs two square matrices of one shape, got {A.shape}, {B.shape}"
        )
    if len(A) < 3:
        raise ValueError("Mantel test needs at least 3 objects")
    if method not in ("pearson", "spearman"):
        raise ValueError(f"method must be 'pearson' or 'spearman', got {method!r}")
    if alternative not in ("greater", "less", "two-sided"):
        raise ValueError(f"alternative must be greater, less or two-sided, got {alternative!r}")
    a = _upper(A)
    if method == "spearman":
        a = rankdata(a)
    iu = np.triu_indices(len(A), k=1)

    def stat(M: np.ndarray) -> float:
        b = M[iu]
        return _corr(a, rankdata(b) if method == "spearman" else b)

    r = stat(B)
    rng = np.random.default_rng(seed)
    perms = np.empty(n_permutations)
    for i in range(n_permutations):
        p = rng.permutation(len(B))
        perms[i] = stat(B[np.ix_(p, p)])
    if alternative == "greater":
        hits = np.sum(perms >= r - 1e-12)
    elif alternative == "less":
        hits = np.sum(perms <= r + 1e-12)
    else:
        hits = np.sum(np.abs(perms) >= abs(r) - 1e-12)
    return {
        "r": r,
        "p_value": float((1 + hits) / (1 + n_permutations)),
        "null_mean": float(perms.mean()) if n_permutations else float("nan"),
        "null_q95": float(np.quantile(perms, 0.95)) if n_permutations else float("nan"),
        "method": method,
        "alternative": alternative,
        "n_objects": int(len(A)),
        "n_permutations": int(n_permutations),
        "seed": seed,
    }


def _nn_match_accuracy(U: np.ndarray, V: np.ndarray) -> float:
    """Fraction of rows i of U whose nearest (Euclidean) row of V is row i."""
    d2 = (U**2).sum(1)[:, None] - 2 * U @ V.T + (V**2).sum(1)[None, :]  # (n, n)
    return float(np.mean(d2.argmin(axis=1) == np.arange(len(U))))


def cca_matching(
    meta: pd.DataFrame,
    X_a,
    X_b,
    *,
    n_components: int = 2,
    split_by: str | Sequence[str] | None = None,
    train_idx: np.ndarray | None = None,
    test_idx: np.ndarray | None = None,
    test_size: float = 0.25,
    max_iter: int = 1000,
    seed: int = 0,
) -> dict:
    """CCA fitted on training pairs; 1-NN matching accuracy between modalities on test pairs.

    Row i of `X_a` and row i of `X_b` describe the same sample. In the shared space of the first
    `n_components` canonical variates (standardised), each test sample of modality A is matched
    to the nearest (Euclidean) test sample of modality B; accuracy is
    reported both ways, with the chance level 1 / n_test.
    """
    A = as_matrix(X_a, len(meta)).astype(np.float64)
    B = as_matrix(X_b, len(meta)).astype(np.float64)
    train, test = resolve_split(
        meta,
        split_by=split_by,
        train_idx=train_idx,
        test_idx=test_idx,
        test_size=test_size,
        seed=seed,
    )
    k = min(n_components, A.shape[1], B.shape[1], len(train) - 1)
    cca = CCA(n_components=k, max_iter=max_iter, scale=True).fit(A[train], B[train])
    Ua, Ub = cca.transform(A[test], B[test])
    Ua = np.asarray(Ua).reshape(len(test), -1)
    Ub = np.asarray(Ub).reshape(len(test), -1)
    # standardise each canonical variate with the training scores so both modalities weigh alike
    Ta, Tb = cca.transform(A[train], B[train])
    Ta, Tb = np.asarray(Ta).reshape(len(train), -1), np.asarray(Tb).reshape(len(train), -1)
    Ua = (Ua - Ta.mean(0)) / (Ta.std(0) + 1e-12)
    Ub = (Ub - Tb.mean(0)) / (Tb.std(0) + 1e-12)
    canon = [float(np.corrcoef(Ua[:, j], Ub[:, j])[0, 1]) for j in range(k)]
    return {
        "accuracy_a_to_b": _nn_match_accuracy(Ua, Ub),
        "accuracy_b_to_a": _nn_match_accuracy(Ub, Ua),
        "chance": 1.0 / len(test),
        "n_components": int(k),
        "test_canonical_correlations": canon,
        "n_train": int(len(train)),
        "n_test": int(len(test)),
        "seed": seed,
    }
