"""Montages of example crops per group: one row per group, per channel or as a composite."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from celldino.pl.colours import composite, scale01
from celldino.pl.figure import finish, new_figure


def montage(
    crops: np.ndarray,
    groups: Sequence[str],
    channels: Sequence[str],
    *,
    per_group: int = 6,
    mode: str = "composite",
    seed: int = 0,
    save: str | Path | None = None,
) -> Figure:
    """Example crops (N, C, H, W) for each group.

    mode='composite': one false-colour image per crop (see `celldino.pl.colours`);
    mode='channels': each crop shown channel by channel in grey.
    """
    crops = np.asarray(crops)
    if crops.ndim != 4 or crops.shape[1] != len(channels):
        raise ValueError(f"crops must be (N, C, H, W) with C = {len(channels)}, got {crops.shape}")
    if mode not in ("composite", "channels"):
        raise ValueError(f"montage mode must be 'composite' or 'channels', got '{mode}'")
    groups = np.asarray([str(g) for g in groups])
    names = sorted(set(groups))
    rng = np.random.default_rng(seed)
    chosen = {}
    for g in names:
        idx = np.flatnonzero(groups == g)
        chosen[g] = rng.choice(idx, size=min(per_group, len(idx)), replace=False)
    ncols = per_group if mode == "composite" else per_group * len(channels)
    fig = new_figure(min(1.1 * ncols + 1.5, 22), 1.15 * len(names) + 0.4)
    gs = fig.add_gridspec(len(names), ncols, wspace=0.03, hspace=0.05)
    for r, g in enumerate(names):
        for j, i in enumerate(chosen[g]):
            if mode == "composite":
                ax = fig.add_subplot(gs[r, j])
                ax.imshow(composite(crops[i], list(channels)))
                panels = [ax]
            else:
                panels = []
                for c in range(len(channels)):
                    ax = fig.add_subplot(gs[r, j * len(channels) + c])
                    ax.imshow(scale01(crops[i, c]), cmap="gray", vmin=0, vmax=1)
                    if r == 0:
                        ax.set_title(channels[c], fontsize=6)
                    panels.append(ax)
            for ax in panels:
                ax.set_xticks([])
                ax.set_yticks([])
            if j == 0:
                panels[0].set_ylabel(g, fontsize=7, rotation=0, ha="right", va="center")
    return finish(fig, save)
