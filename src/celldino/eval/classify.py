"""Classification on frozen features: cosine kNN, linear probe, the paper's MLP, block search.

Every function takes the metadata table and the feature matrix (rows aligned), names the label
column explicitly, splits by group (`split_by`, e.g. 'Metadata_Plate') or takes explicit
`train_idx`/`test_idx`, and returns a tidy table with one row per (classifier, setting):
`classifier, task, k, macro_f1, n_train, n_test, n_classes, split_by, seed` and the columns of
`celldino.eval.stats.STAT_COLUMNS`: `chance` (the better of the majority-class and stratified-
random macro-F1 on this test set), `ci_low`/`ci_high` (bootstrap of test samples, `n_boot`
resamples), `p_perm` (`n_perm` shuffles of the test labels among test groups, predictions
fixed), `n_queries` (test samples) and `flags`.

The MLP follows Cell-DINO: 512 → 256 → classes with ReLU and dropout 0.5, AdamW with a cosine
learning-rate schedule, inputs z-scored with the training statistics, training samples drawn
with probability inversely proportional to their label's frequency, and BCE-with-logits for
multi-label targets (labels joined by `sep` in one column, e.g. 'Nucleoplasm|Mitochondria').
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from torch import nn

from celldino.eval.spec import profiles_of
from celldino.eval.splits import group_split
from celldino.eval.stats import STAT_COLUMNS, f1_statistics, rng_for, warn_flags
from celldino.log import get_logger
from celldino.probes import zscore_fit  # one z-scoring for every probe (moa, multitask too)

if TYPE_CHECKING:
    from anndata import AnnData

logger = get_logger(__name__)

KS = (1, 5, 10, 20, 50)


# ---- inputs ----------------------------------------------------------------------------------


def as_matrix(X, n_rows: int | None = None) -> np.ndarray:
    """A float32 (n, d) matrix from an array or DataFrame; checks rows and finite values."""
    arr = np.asarray(X.to_numpy() if isinstance(X, pd.DataFrame) else X, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"features must be a 2-D matrix (rows = cells/profiles), got {arr.shape}")
    if n_rows is not None and arr.shape[0] != n_rows:
        raise ValueError(
            f"features have {arr.shape[0]} rows but the metadata has {n_rows}: they must be aligned"
        )
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        raise ValueError(
            f"features have NaN/inf in {int(bad.sum())} rows (first: {np.flatnonzero(bad)[:5]}); "
            "drop or impute them first"
        )
    return arr


def encode_labels(meta: pd.DataFrame, label: str) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes (n,) and the sorted class names of a single-label column."""
    if label not in meta.columns:
        raise KeyError(f"label column '{label}' not in the metadata: {list(meta.columns)}")
    values = meta[label]
    if values.isna().any():
        rows = list(np.flatnonzero(values.isna().to_numpy())[:5])
        raise ValueError(f"label column '{label}' has missing labels at rows {rows}")
    classes, codes = np.unique(values.astype(str).to_numpy(), return_inverse=True)
    return codes.astype(np.int64), classes


def encode_multilabel(
    meta: pd.DataFrame, label: str, *, sep: str = "|"
) -> tuple[np.ndarray, np.ndarray]:
    """Binary indicator matrix (n, classes) and class names of a `sep`-joined label column."""
    if label not in meta.columns:
        raise KeyError(f"label column '{label}' not in the metadata: {list(meta.columns)}")
    sets = [
        sorted({p.strip() for p in str(v).split(sep) if p.strip()}) if pd.notna(v) else []
        for v in meta[label]
    ]
    classes = np.array(sorted({c for s in sets for c in s}))
    index = {c: i for i, c in enumerate(classes)}
    Y = np.zeros((len(sets), len(classes)), dtype=np.float32)
    for i, s in enumerate(sets):
        Y[i, [index[c] for c in s]] = 1.0
    return Y, classes


def resolve_split(
    meta: pd.DataFrame,
    *,
    split_by: str | Sequence[str] | None,
    train_idx: np.ndarray | None,
    test_idx: np.ndarray | None,
    test_size: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Explicit indices win; otherwise a group split by `split_by` (required)."""
    if train_idx is not None and test_idx is not None:
        train, test = np.asarray(train_idx), np.asarray(test_idx)
        if np.intersect1d(train, test).size:
            raise ValueError("train_idx and test_idx share rows")
        return train, test
    if split_by is None:
        raise ValueError(
            "pass split_by=<group column(s)> (e.g. 'Metadata_Plate') or train_idx and test_idx: "
            "a random row split leaks wells and plates into the test set"
        )
    return group_split(meta, by=split_by, test_size=test_size, seed=seed)


def _row(
    classifier: str,
    task: str,
    score: float,
    n_train: int,
    n_test: int,
    n_classes: int,
    split_by,
    seed: int,
    k: float = np.nan,
    stats: dict | None = None,
) -> dict:
    by = split_by if split_by is None or isinstance(split_by, str) else "+".join(split_by)
    stats = stats or {c: (np.nan if c != "flags" else "") for c in STAT_COLUMNS}
    return {
        "classifier": classifier,
        "task": task,
        "k": k,
        "macro_f1": float(score),
        "n_train": int(n_train),
        "n_test": int(n_test),
        "n_classes": int(n_classes),
        "split_by": by,
        "seed": seed,
        **{c: stats[c] for c in STAT_COLUMNS},
    }


def _groups_of(meta: pd.DataFrame, split_by, groups) -> np.ndarray | None:
    """Per-row group labels the permutation null shuffles labels among (the split's groups)."""
    if groups is not None:
        return np.asarray(groups)
    if split_by is None:
        return None
    cols = [split_by] if isinstance(split_by, str) else list(split_by)
    return meta[cols].astype(str).agg("|".join, axis=1).to_numpy()


def _stats(
    name: str,
    y_train: np.ndarray,
    y_test: np.ndarray,
    pred: np.ndarray,
    n_classes: int,
    groups: np.ndarray | None,
    n_boot: int,
    n_perm: int,
    seed: int,
    flags: Sequence[str] = (),
) -> dict:
    st = f1_statistics(
        y_train,
        y_test,
        pred,
        n_classes,
        groups=groups,
        n_boot=n_boot,
        n_perm=n_perm,
        rng=rng_for(seed, name),
        flags=flags,
    )
    warn_flags(name, [st["flags"]])
    return st


# ---- kNN -------------------------------------------------------------------------------------


def _unit(X: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(
            f"{int((norms == 0).sum())} feature rows are all zero: cosine similarity is undefined"
        )
    return X / norms


def cosine_neighbors(
    X_train: np.ndarray, X_test: np.ndarray, *, k: int, block: int = 2048
) -> np.ndarray:
    """Indices (n_test, k) of the k most cosine-similar training rows, most similar first."""
    A, B = _unit(X_train), _unit(X_test)
    k = min(k, len(A))
    out = np.empty((len(B), k), dtype=np.int64)
    for s in range(0, len(B), block):
        sim = B[s : s + block] @ A.T  # (b, n_train)
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k]  # (b, k) unordered
        order = np.argsort(-np.take_along_axis(sim, top, axis=1), axis=1, kind="stable")
        out[s : s + block] = np.take_along_axis(top, order, axis=1)
    return out


def vote(neighbor_labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Majority vote per row (ties → the smallest class code, as scikit-learn does)."""
    counts = np.zeros((len(neighbor_labels), n_classes), dtype=np.int64)
    rows = np.repeat(np.arange(len(neighbor_labels)), neighbor_labels.shape[1])
    np.add.at(counts, (rows, neighbor_labels.ravel()), 1)
    return counts.argmax(axis=1)


def knn_f1(
    meta: pd.DataFrame | AnnData,
    X=None,
    *,
    label: str,
    ks: Sequence[int] = KS,
    split_by: str | Sequence[str] | None = None,
    train_idx: np.ndarray | None = None,
    test_idx: np.ndarray | None = None,
    test_size: float = 0.25,
    seed: int = 0,
    n_boot: int = 0,
    n_perm: int = 0,
    groups: np.ndarray | None = None,
) -> pd.DataFrame:
    """Macro-F1 of cosine kNN (uniform vote) for each k in `ks` on a group split, with its
    chance level, bootstrap interval and permutation p-value (module docstring)."""
    meta, X = profiles_of(meta, X)
    groups = _groups_of(meta, split_by, groups)
    X = as_matrix(X, len(meta))
    y, classes = encode_labels(meta, label)
    train, test = resolve_split(
        meta,
        split_by=split_by,
        train_idx=train_idx,
        test_idx=test_idx,
        test_size=test_size,
        seed=seed,
    )
    nbrs = cosine_neighbors(X[train], X[test], k=max(ks))
    rows = []
    for k in ks:
        k_eff = min(k, len(train))
        if k_eff < k:
            logger.warning("kNN: k=%d > %d training rows; using k=%d", k, len(train), k_eff)
        pred = vote(y[train][nbrs[:, :k_eff]], len(classes))
        score = f1_score(y[test], pred, average="macro")
        flags = [f"k={k} >= {len(train)} training rows"] if k >= len(train) else []
        st = _stats(
            f"knn_k{k}",
            y[train],
            y[test],
            pred,
            len(classes),
            None if groups is None else groups[test],
            n_boot,
            n_perm,
            seed,
            flags,
        )
        rows.append(
            _row("knn", label, score, len(train), len(test), len(classes), split_by, seed, k, st)
        )
    return pd.DataFrame(rows)


# ---- linear probe ----------------------------------------------------------------------------


def linear_probe(
    meta: pd.DataFrame | AnnData,
    X=None,
    *,
    label: str,
    split_by: str | Sequence[str] | None = None,
    train_idx: np.ndarray | None = None,
    test_idx: np.ndarray | None = None,
    test_size: float = 0.25,
    C: float = 1.0,
    max_iter: int = 2000,
    class_weight: str | None = "balanced",
    seed: int = 0,
    n_boot: int = 0,
    n_perm: int = 0,
    groups: np.ndarray | None = None,
) -> pd.DataFrame:
    """Macro-F1 of a logistic-regression probe on features z-scored with training statistics,
    with its chance level, bootstrap interval and permutation p-value (module docstring)."""
    meta, X = profiles_of(meta, X)
    groups = _groups_of(meta, split_by, groups)
    X = as_matrix(X, len(meta))
    y, classes = encode_labels(meta, label)
    train, test = resolve_split(
        meta,
        split_by=split_by,
        train_idx=train_idx,
        test_idx=test_idx,
        test_size=test_size,
        seed=seed,
    )
    mean, std = zscore_fit(X[train])
    if len(np.unique(y[train])) < 2:
        pred = np.full(len(test), y[train][0])
    else:
        clf = LogisticRegression(
            C=C, max_iter=max_iter, class_weight=class_weight, random_state=seed
        )
        clf.fit((X[train] - mean) / std, y[train])
        pred = clf.predict((X[test] - mean) / std)
    score = f1_score(y[test], pred, average="macro")
    g = None if groups is None else groups[test]
    st = _stats("linear", y[train], y[test], pred, len(classes), g, n_boot, n_perm, seed)
    return pd.DataFrame(
        [
            _row(
                "linear",
                label,
                score,
                len(train),
                len(test),
                len(classes),
                split_by,
                seed,
                stats=st,
            )
        ]
    )


# ---- the paper's MLP -------------------------------------------------------------------------


class MLPClassifier(nn.Module):
    """Cell-DINO's probe: in → 512 → 256 → classes, ReLU and dropout 0.5 between layers."""

    def __init__(
        self, in_dim: int, n_classes: int, hidden: Sequence[int] = (512, 256), dropout: float = 0.5
    ):
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU(), nn.Dropout(dropout)]
            d = h
        layers.append(nn.Linear(d, n_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in_dim) → (B, n_classes)
        return self.net(x)


@dataclass(frozen=True)
class MLPOptions:
    epochs: int = 30  # passes over the (resampled) training set
    batch_size: int = 256  # samples per step
    lr: float = 1e-3  # peak AdamW learning rate (cosine decay to 0 over all steps)
    weight_decay: float = 1e-4  # AdamW weight decay
    hidden: tuple[int, ...] = (512, 256)  # hidden layer widths
    dropout: float = 0.5  # dropout after each hidden layer
    balance: bool = True  # resample training rows inversely to label frequency
    device: str = "cpu"  # torch device


def sample_weights(Y: np.ndarray) -> np.ndarray:
    """Per-row weights ∝ 1 / label frequency (multi-label: rarest positive label of the row)."""
    if Y.ndim == 1:
        freq = np.bincount(Y).astype(np.float64)
        return 1.0 / freq[Y]
    freq = Y.sum(axis=0).astype(np.float64)
    inv = np.where(freq > 0, 1.0 / np.maximum(freq, 1), 0.0)
    w = (Y * inv).max(axis=1)
    empty = Y.sum(axis=1) == 0
    if empty.any():
        w[empty] = 1.0 / empty.sum()
    return w


def fit_mlp(
    X_train: np.ndarray, Y_train: np.ndarray, *, n_classes: int, options: MLPOptions, seed: int
) -> tuple[MLPClassifier, np.ndarray, np.ndarray]:
    """Train the MLP; Y_train is (n,) class codes or an (n, classes) 0/1 matrix (multi-label)."""
    multilabel = Y_train.ndim == 2
    mean, std = zscore_fit(X_train)
    Xt = torch.from_numpy(((X_train - mean) / std).astype(np.float32))
    Yt = torch.from_numpy(Y_train.astype(np.float32 if multilabel else np.int64))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        model = MLPClassifier(Xt.shape[1], n_classes, options.hidden, options.dropout)
        model.to(options.device).train()
        opt = torch.optim.AdamW(
            model.parameters(), lr=options.lr, weight_decay=options.weight_decay
        )
        steps_per_epoch = max(1, int(np.ceil(len(Xt) / options.batch_size)))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(
            opt, T_max=options.epochs * steps_per_epoch
        )
        loss_fn = nn.BCEWithLogitsLoss() if multilabel else nn.CrossEntropyLoss()
        w = torch.from_numpy(sample_weights(Y_train)) if options.balance else None
        for _ in range(options.epochs):
            if w is not None:
                idx = torch.multinomial(w, len(Xt), replacement=True, generator=gen)
            else:
                idx = torch.randperm(len(Xt), generator=gen)
            for s in range(0, len(idx), options.batch_size):
                b = idx[s : s + options.batch_size]
                logits = model(Xt[b].to(options.device))  # (B, n_classes)
                loss = loss_fn(logits, Yt[b].to(options.device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return model.eval(), mean, std


@torch.no_grad()
def predict_mlp(
    model: MLPClassifier, X: np.ndarray, mean: np.ndarray, std: np.ndarray, *, device: str = "cpu"
) -> np.ndarray:
    """Logits (n, classes) of z-scored inputs."""
    x = torch.from_numpy(((X - mean) / std).astype(np.float32)).to(device)
    return model(x).cpu().numpy()


def mlp_f1(
    meta: pd.DataFrame | AnnData,
    X=None,
    *,
    label: str,
    multilabel: bool = False,
    sep: str = "|",
    split_by: str | Sequence[str] | None = None,
    train_idx: np.ndarray | None = None,
    test_idx: np.ndarray | None = None,
    test_size: float = 0.25,
    options: MLPOptions | None = None,
    threshold: float = 0.5,
    seed: int = 0,
    n_boot: int = 0,
    n_perm: int = 0,
    groups: np.ndarray | None = None,
) -> pd.DataFrame:
    """Macro-F1 of the paper's MLP (multi-label: sigmoid > `threshold`, macro over labels);
    single-label: with its chance level, bootstrap interval and permutation p-value."""
    meta, X = profiles_of(meta, X)
    groups = _groups_of(meta, split_by, groups)
    options = options or MLPOptions()
    X = as_matrix(X, len(meta))
    if multilabel:
        Y, classes = encode_multilabel(meta, label, sep=sep)
    else:
        Y, classes = encode_labels(meta, label)
    train, test = resolve_split(
        meta,
        split_by=split_by,
        train_idx=train_idx,
        test_idx=test_idx,
        test_size=test_size,
        seed=seed,
    )
    model, mean, std = fit_mlp(
        X[train], Y[train], n_classes=len(classes), options=options, seed=seed
    )
    logits = predict_mlp(model, X[test], mean, std, device=options.device)
    if multilabel:
        pred = (1.0 / (1.0 + np.exp(-logits)) > threshold).astype(int)
        score = f1_score(Y[test].astype(int), pred, average="macro", zero_division=0)
        st = None  # multi-label: no chance level / interval here
    else:
        pred = logits.argmax(axis=1)
        score = f1_score(Y[test], pred, average="macro")
        g = None if groups is None else groups[test]
        st = _stats("mlp", Y[train], Y[test], pred, len(classes), g, n_boot, n_perm, seed)
    name = "mlp_multilabel" if multilabel else "mlp"
    return pd.DataFrame(
        [_row(name, label, score, len(train), len(test), len(classes), split_by, seed, stats=st)]
    )


# ---- all classifiers, and the search over blocks --------------------------------------------


def classify(
    meta: pd.DataFrame | AnnData,
    X=None,
    *,
    label: str,
    classifiers: Sequence[str] = ("knn", "linear", "mlp"),
    ks: Sequence[int] = KS,
    split_by: str | Sequence[str] | None = None,
    train_idx: np.ndarray | None = None,
    test_idx: np.ndarray | None = None,
    test_size: float = 0.25,
    mlp_options: MLPOptions | None = None,
    seed: int = 0,
    n_boot: int = 0,
    n_perm: int = 0,
) -> pd.DataFrame:
    """kNN, linear probe and MLP on one shared group split; one tidy table (with the chance
    level, `n_boot` bootstrap interval and `n_perm` permutation p-value of each F1)."""
    meta, X = profiles_of(meta, X)
    unknown = set(classifiers) - {"knn", "linear", "mlp"}
    if unknown:
        raise ValueError(f"unknown classifier(s) {sorted(unknown)}; choose from knn, linear, mlp")
    train, test = resolve_split(
        meta,
        split_by=split_by,
        train_idx=train_idx,
        test_idx=test_idx,
        test_size=test_size,
        seed=seed,
    )
    common = dict(
        label=label,
        train_idx=train,
        test_idx=test,
        seed=seed,
        n_boot=n_boot,
        n_perm=n_perm,
        groups=_groups_of(meta, split_by, None),
    )
    tables = []
    if "knn" in classifiers:
        tables.append(knn_f1(meta, X, ks=ks, **common))
    if "linear" in classifiers:
        tables.append(linear_probe(meta, X, **common))
    if "mlp" in classifiers:
        tables.append(mlp_f1(meta, X, options=mlp_options, **common))
    out = pd.concat(tables, ignore_index=True)
    out["split_by"] = (
        split_by if split_by is None or isinstance(split_by, str) else "+".join(split_by)
    )
    return out


def block_search(
    meta: pd.DataFrame,
    blocks: Mapping[str | int, np.ndarray] | Sequence[np.ndarray],
    *,
    labels: Sequence[str],
    classifier: str = "knn",
    k: int = 20,
    split_by: str | Sequence[str] | None = None,
    train_idx: np.ndarray | None = None,
    test_idx: np.ndarray | None = None,
    test_size: float = 0.25,
    seed: int = 0,
) -> tuple[pd.DataFrame, dict]:
    """Score every transformer block's features on every task; report the best block per task.

    `blocks` maps a block name (or index, for a list) to its (n, D) class-token matrix, e.g. the
    `blocks` output of the backbone. Returns the tidy table (one row per block × task) with an
    `is_best` column, and {task: {"best_block", "macro_f1"}}.
    """
    if isinstance(blocks, Mapping):
        items = list(blocks.items())
    else:
        items = list(enumerate(blocks))
    if not items:
        raise ValueError("block_search needs at least one block feature matrix")
    if classifier not in ("knn", "linear"):
        raise ValueError(f"block_search classifier must be 'knn' or 'linear', got {classifier!r}")
    train, test = resolve_split(
        meta,
        split_by=split_by,
        train_idx=train_idx,
        test_idx=test_idx,
        test_size=test_size,
        seed=seed,
    )
    rows = []
    for name, block_X in items:
        for task in labels:
            if classifier == "knn":
                t = knn_f1(
                    meta, block_X, label=task, ks=(k,), train_idx=train, test_idx=test, seed=seed
                )
            else:
                t = linear_probe(
                    meta, block_X, label=task, train_idx=train, test_idx=test, seed=seed
                )
            t.insert(0, "block", name)
            rows.append(t)
    table = pd.concat(rows, ignore_index=True)
    table["split_by"] = (
        split_by if split_by is None or isinstance(split_by, str) else "+".join(split_by)
    )
    best_idx = table.groupby("task", sort=False)["macro_f1"].idxmax()
    table["is_best"] = False
    table.loc[best_idx.to_numpy(), "is_best"] = True
    summary = {
        task: {
            "best_block": getattr(b := table.loc[i, "block"], "item", lambda: b)(),
            "macro_f1": float(table.loc[i, "macro_f1"]),
        }
        for task, i in best_idx.items()
    }
    return table, summary
