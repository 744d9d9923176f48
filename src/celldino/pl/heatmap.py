"""Similarity heatmaps with hierarchical ordering and group colour bars; confusion matrices."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from scipy.cluster.hierarchy import leaves_list, linkage
from scipy.spatial.distance import squareform

from celldino.pl.embedding import _categorical_colours
from celldino.pl.figure import finish, new_figure


def hierarchical_order(similarity: np.ndarray, method: str = "average") -> np.ndarray:
    """Leaf order of average-linkage clustering on 1 - similarity."""
    s = np.asarray(similarity, dtype=np.float64)
    if len(s) < 3:
        return np.arange(len(s))
    dist = np.clip(1.0 - (s + s.T) / 2, 0, None)
    np.fill_diagonal(dist, 0.0)
    return leaves_list(linkage(squareform(dist, checks=False), method=method))


def similarity_heatmap(
    similarity: np.ndarray,
    labels: Sequence[str],
    *,
    groups: Sequence[str] | None = None,
    order: bool = True,
    title: str = "Cosine similarity",
    save: str | Path | None = None,
) -> Figure:
    """Square heatmap; rows ordered by hierarchical clustering; a colour bar per group (e.g. MoA)."""
    s = np.asarray(similarity, dtype=np.float64)
    if s.shape != (len(labels), len(labels)):
        raise ValueError(f"similarity is {s.shape} but there are {len(labels)} labels")
    idx = hierarchical_order(s) if order else np.arange(len(s))
    n = len(s)
    size = min(12.0, 3.0 + 0.18 * n)
    fig = new_figure(size + 1.2, size)
    gs = fig.add_gridspec(1, 2, width_ratios=[0.04, 1], wspace=0.01)
    ax = fig.add_subplot(gs[0, 1])
    im = ax.imshow(s[np.ix_(idx, idx)], cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.6, label="cosine similarity")
    tick_labels = [str(labels[i]) for i in idx]
    if n <= 60:
        ax.set_xticks(range(n), tick_labels, rotation=90, fontsize=6)
        ax.set_yticks(range(n), tick_labels, fontsize=6)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_title(title)
    bar = fig.add_subplot(gs[0, 0])
    bar.set_xticks([])
    bar.set_yticks([])
    if groups is not None:
        cats = pd.Categorical([str(g) for g in groups])
        colours = np.array(_categorical_colours(len(cats.categories)))
        bar.imshow(colours[cats.codes[idx]][:, None, :], aspect="auto", interpolation="nearest")
        handles = [Patch(color=colours[i], label=c) for i, c in enumerate(cats.categories)]
        fig.legend(
            handles=handles,
            loc="outside lower center",
            ncol=min(4, len(handles)),
            fontsize=7,
            frameon=False,
        )
    return finish(fig, save)


def confusion_matrix(
    y_true: Sequence,
    y_pred: Sequence,
    *,
    labels: Sequence[str] | None = None,
    normalize: bool = True,
    title: str = "Confusion matrix",
    save: str | Path | None = None,
) -> Figure:
    """Rows = true class, columns = predicted; normalised per row when `normalize`."""
    from sklearn.metrics import confusion_matrix as sk_cm

    labels = (
        list(labels)
        if labels is not None
        else sorted(set(map(str, y_true)) | set(map(str, y_pred)))
    )
    cm = sk_cm([str(y) for y in y_true], [str(y) for y in y_pred], labels=labels).astype(float)
    if normalize:
        cm = cm / np.clip(cm.sum(1, keepdims=True), 1, None)
    n = len(labels)
    fig = new_figure(2.5 + 0.5 * n, 2.0 + 0.5 * n)
    ax = fig.add_subplot()
    im = ax.imshow(cm, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    for i in range(n):
        for j in range(n):
            ax.text(
                j,
                i,
                f"{cm[i, j]:.2f}" if normalize else f"{int(cm[i, j])}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if cm[i, j] > 0.6 * cm.max() else "black",
            )
    ax.set_xticks(range(n), labels, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(n), labels, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, shrink=0.7)
    return finish(fig, save)
