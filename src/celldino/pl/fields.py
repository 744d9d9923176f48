"""Thumbnails of whole fields of view (learned QC's flagged fields in the report)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from celldino.pl.colours import composite
from celldino.pl.figure import finish, new_figure


def downsample(image: np.ndarray, side: int) -> np.ndarray:
    """(C, H, W) → (C, h, w) by block means, the longer side at most `side` px."""
    x = np.asarray(image, dtype=np.float32)
    f = max(1, math.ceil(max(x.shape[1:]) / side))
    if f == 1:
        return x
    C, H, W = x.shape
    h, w = H // f, W // f
    return x[:, : h * f, : w * f].reshape(C, h, f, w, f).mean(axis=(2, 4))


def field_thumbnails(
    fields: Sequence[np.ndarray],
    titles: Sequence[str],
    channels: Sequence[str],
    *,
    side: int = 160,
    ncols: int = 6,
    save: str | Path | None = None,
) -> Figure:
    """A grid of false-colour composites (see `celldino.pl.colours`) of whole fields (C, H, W),
    each downsampled to at most `side` px and titled."""
    if len(fields) != len(titles):
        raise ValueError(f"{len(fields)} fields but {len(titles)} titles")
    n = max(1, len(fields))
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig = new_figure(1.9 * ncols + 0.2, 2.2 * nrows + 0.2)
    for i, (img, title) in enumerate(zip(fields, titles)):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.imshow(composite(downsample(img, side), list(channels)))
        ax.set_title(title, fontsize=6)
        ax.set_xticks([])
        ax.set_yticks([])
    return finish(fig, save)
