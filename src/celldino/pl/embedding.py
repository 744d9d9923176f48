"""UMAP of embeddings or profiles, coloured by any metadata column.

Both functions take `(X, obs)` (a feature matrix and its metadata) or an AnnData.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from celldino.pl.figure import finish, new_figure
from celldino.pl.inputs import matrix_and_obs

if TYPE_CHECKING:
    import anndata as ad


def umap_coords(
    X: np.ndarray | ad.AnnData,
    obs: pd.DataFrame | None = None,
    *,
    fit_on: Sequence[str] | None = None,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    seed: int = 0,
) -> np.ndarray:
    """2-D UMAP coordinates of every row of X.

    With `fit_on` (e.g. ['Metadata_Plate', 'Metadata_Well', 'Metadata_Site']) UMAP is fitted on
    the mean of each group (field-level means, as in Cell-DINO) and every single row is then
    projected with the fitted model, so the layout reflects treatments rather than cell noise.
    """
    import umap as umap_lib

    X, obs = matrix_and_obs(X, obs)
    X = np.asarray(X, dtype=np.float32)
    if len(X) != len(obs):
        raise ValueError(f"X has {len(X)} rows but obs has {len(obs)}")
    if fit_on:
        missing = [c for c in fit_on if c not in obs.columns]
        if missing:
            raise ValueError(
                f"fit_on columns {missing} are not in the metadata (have {list(obs.columns)})"
            )
        keys = obs[list(fit_on)].astype(str).agg("|".join, axis=1).to_numpy()
        _, inverse = np.unique(keys, return_inverse=True)
        means = np.stack([X[inverse == g].mean(0) for g in range(inverse.max() + 1)])
        fit_X = means
    else:
        fit_X = X
    k = max(2, min(n_neighbors, len(fit_X) - 1))
    reducer = umap_lib.UMAP(n_neighbors=k, min_dist=min_dist, random_state=seed, n_jobs=1)
    reducer.fit(fit_X)
    return reducer.transform(X) if fit_on else reducer.embedding_


def umap(
    X: np.ndarray | ad.AnnData,
    obs: pd.DataFrame | None = None,
    *,
    color: str,
    fit_on: Sequence[str] | None = None,
    coords: np.ndarray | None = None,
    title: str = "",
    seed: int = 0,
    point_size: float = 6.0,
    save: str | Path | None = None,
) -> Figure:
    """Scatter of the UMAP coordinates coloured by `obs[color]` (categorical or numeric)."""
    X, obs = matrix_and_obs(X, obs)
    if color not in obs.columns:
        raise ValueError(
            f"colour column '{color}' is not in the metadata (have {list(obs.columns)})"
        )
    xy = coords if coords is not None else umap_coords(X, obs, fit_on=fit_on, seed=seed)
    fig = new_figure(6.4, 5.0)
    ax = fig.add_subplot()
    values = obs[color]
    if pd.api.types.is_numeric_dtype(values) and values.nunique() > 12:
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=values, s=point_size, cmap="viridis", linewidths=0)
        fig.colorbar(sc, ax=ax, label=color)
    else:
        cats = pd.Categorical(values.astype(str))
        cmap = _categorical_colours(len(cats.categories))
        for i, cat in enumerate(cats.categories):
            m = np.asarray(cats == cat)
            ax.scatter(xy[m, 0], xy[m, 1], s=point_size, color=cmap[i], label=cat, linewidths=0)
        ax.legend(
            markerscale=2.5, fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1, 0.5)
        )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("UMAP 1")
    ax.set_ylabel("UMAP 2")
    ax.set_title(title or f"UMAP coloured by {color}" + (" (fit on group means)" if fit_on else ""))
    return finish(fig, save)


def _categorical_colours(n: int) -> list:
    import matplotlib

    base = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [base(i % base.N) for i in range(n)]
