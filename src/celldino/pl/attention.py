"""Attention maps per head, PCA of patch tokens as RGB, patch matching across cells, and the
head × channel IoU heatmap."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from celldino.pl.colours import composite
from celldino.pl.figure import finish, new_figure


def _grid(n_tokens: int) -> int:
    side = int(round(np.sqrt(n_tokens)))
    if side * side != n_tokens:
        raise ValueError(f"{n_tokens} patch tokens do not form a square grid")
    return side


def attention_maps(
    image: np.ndarray,
    attention: np.ndarray,
    channels: Sequence[str],
    *,
    title: str = "",
    save: str | Path | None = None,
) -> Figure:
    """The cell (composite) and the class token's attention over patches for each head.

    attention, any of:
    - (heads, h, w): the stored maps (`attn_maps` of an attention store), drawn as they are;
      (heads, C, h, w) of a channel-adaptive model as C·heads maps;
    - (heads, N): the class token's attention to the N patch tokens (registers removed), N a
      square;
    - (heads, T, T): the last block's full attention matrix (every row sums to 1), whose row 0
      over the last square number of tokens is used.
    Any other shape is refused (it used to be read as a matrix and drawn wrong without a word).
    """
    maps = _head_maps(np.asarray(attention, dtype=np.float32))
    heads = maps.shape[0]
    height, width = np.asarray(image).shape[-2:]
    fig = new_figure(1.9 * (heads + 1), 2.2)
    ax = fig.add_subplot(1, heads + 1, 1)
    ax.imshow(composite(np.asarray(image), list(channels)))
    ax.set_title(title or "cell", fontsize=8)
    ax.axis("off")
    for i in range(heads):
        ax = fig.add_subplot(1, heads + 1, i + 2)
        # one block per patch over the cell's extent (h x w patches need not be square)
        ax.imshow(maps[i], cmap="inferno", interpolation="nearest", extent=(0, width, height, 0))
        ax.set_title(f"head {i}", fontsize=8)
        ax.axis("off")
    return finish(fig, save)


def _head_maps(att: np.ndarray) -> np.ndarray:
    """(heads, h, w) maps from any of the shapes `attention_maps` takes; DataError otherwise."""
    from celldino.errors import DataError

    if att.ndim == 4:  # channel-adaptive (heads, C, h, w)
        return att.reshape(-1, *att.shape[-2:])
    if att.ndim == 3 and att.shape[1] == att.shape[2] and att.shape[1] >= 2:
        rows = att.sum(axis=2)
        if np.allclose(rows, 1.0, atol=1e-3):  # softmax rows: the full (heads, T, T) matrix
            att = att[:, 0, 1:]
            att = att[:, -(_grid_tokens(att.shape[1])) :]
    if att.ndim == 3:  # (heads, h, w) maps (a T x T matrix's rows sum to 1; a map's cannot)
        return att
    if att.ndim == 2:
        side = int(round(np.sqrt(att.shape[1])))
        if side * side != att.shape[1]:
            raise DataError(
                f"attention of shape {att.shape}: {att.shape[1]} patch tokens do not form a "
                "square grid; pass the maps as (heads, h, w)"
            )
        return att.reshape(att.shape[0], side, side)
    raise DataError(
        f"attention of shape {att.shape}: give (heads, h, w) maps (an attention store's "
        "attn_maps), (heads, C, h, w), (heads, N) patch attention or the (heads, T, T) matrix"
    )


def _grid_tokens(n: int) -> int:
    """Largest square count ≤ n (patch tokens after any register tokens)."""
    return int(np.floor(np.sqrt(n))) ** 2


def patch_pca_rgb(patch_tokens: np.ndarray) -> np.ndarray:
    """(B, N, D) patch tokens → (B, side, side, 3): the first 3 principal components, jointly fitted."""
    tokens = np.asarray(patch_tokens, dtype=np.float64)
    b, n, d = tokens.shape
    side = _grid(n)
    flat = tokens.reshape(-1, d)
    flat = flat - flat.mean(0)
    _, _, vt = np.linalg.svd(flat, full_matrices=False)
    proj = flat @ vt[:3].T
    lo, hi = np.percentile(proj, 1, axis=0), np.percentile(proj, 99, axis=0)
    rgb = np.clip((proj - lo) / np.maximum(hi - lo, 1e-9), 0, 1)
    return rgb.reshape(b, side, side, 3)


def patch_match(
    images: np.ndarray,
    patch_tokens: np.ndarray,
    channels: Sequence[str],
    *,
    query: tuple[int, int],
    save: str | Path | None = None,
) -> Figure:
    """Cosine similarity of one query patch (cell index, patch index) to every patch of every cell.

    Row 1: the cells as composites (query patch boxed); row 2: PCA-of-patches as RGB;
    row 3: the similarity maps.
    """
    tokens = np.asarray(patch_tokens, dtype=np.float64)
    b, n, _ = tokens.shape
    side = _grid(n)
    qi, qp = query
    unit = tokens / np.linalg.norm(tokens, axis=-1, keepdims=True).clip(1e-12)
    sim = unit @ unit[qi, qp]  # (B, N)
    pca = patch_pca_rgb(tokens)
    size = images.shape[-1]
    fig = new_figure(2.0 * b, 6.2)
    for i in range(b):
        ax = fig.add_subplot(3, b, i + 1)
        ax.imshow(composite(images[i], list(channels)))
        if i == qi:
            step = size / side
            r, c = divmod(qp, side)
            ax.add_patch(_query_box(c * step, r * step, step))
        ax.axis("off")
        ax = fig.add_subplot(3, b, b + i + 1)
        ax.imshow(pca[i], interpolation="nearest")
        ax.axis("off")
        ax = fig.add_subplot(3, b, 2 * b + i + 1)
        ax.imshow(
            sim[i].reshape(side, side), cmap="viridis", vmin=-1, vmax=1, interpolation="nearest"
        )
        ax.axis("off")
    fig.suptitle(
        "query patch (boxed) · PCA of patch tokens · cosine similarity to the query", fontsize=9
    )
    return finish(fig, save)


def _query_box(x: float, y: float, s: float):
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.5, y - 0.5), s, s, fill=False, ec="white", lw=1.5)


def head_channel_heatmap(
    iou: pd.DataFrame,
    *,
    title: str = "Attention head × channel IoU",
    save: str | Path | None = None,
) -> Figure:
    """Heatmap of a (heads × channels) IoU table (`celldino.eval.head_channel_iou`, or the
    `attention_iou` analysis's long table pivoted), each cell annotated with its value."""
    M = iou.to_numpy(dtype=np.float64)
    h, c = M.shape
    fig = new_figure(2.2 + 0.9 * c, 1.4 + 0.45 * h)
    ax = fig.add_subplot()
    im = ax.imshow(M, cmap="viridis", vmin=0, vmax=max(1e-9, np.nanmax(M)), aspect="auto")
    for i in range(h):
        for j in range(c):
            if np.isfinite(M[i, j]):
                ax.text(j, i, f"{M[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w")
    ax.set_xticks(range(c), [str(x) for x in iou.columns], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(h), [str(x) for x in iou.index], fontsize=8)
    fig.colorbar(im, ax=ax, shrink=0.8, label="IoU")
    ax.set_title(title, fontsize=9)
    return finish(fig, save)
