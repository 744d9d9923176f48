"""Fixed-size single-cell crops around cell centres.

`crop_cells(image (C, H, W), centers (n, 2) as (y, x), size)` → (crops (m, C, size, size), kept
indices). Border cells are padded with zeros (`border="pad"`) or dropped (`border="drop"`).
With `labels` and `mask_neighbours=True`, pixels of other cells inside a crop are set to 0.
"""

from __future__ import annotations

import numpy as np

BORDERS = ("pad", "drop")


def crop_box(cy: float, cx: float, size: int) -> tuple[int, int, int, int]:
    """(y0, x0, y1, x1) of the size x size box centred on (cy, cx), possibly outside the image."""
    y0 = int(np.floor(cy)) - size // 2
    x0 = int(np.floor(cx)) - size // 2
    return y0, x0, y0 + size, x0 + size


def crop_cells(
    image: np.ndarray,
    centers: np.ndarray,
    size: int,
    *,
    border: str = "pad",
    labels: np.ndarray | None = None,
    cell_ids: np.ndarray | None = None,
    mask_neighbours: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Crops (m, C, size, size) in the image dtype and the indices (into centers) kept."""
    if border not in BORDERS:
        raise ValueError(f"border '{border}' is not one of: {', '.join(BORDERS)}")
    if mask_neighbours and (labels is None or cell_ids is None):
        raise ValueError("mask_neighbours needs the label image and the cell ids")
    c, h, w = image.shape
    centers = np.asarray(centers, dtype=np.float64).reshape(-1, 2)
    out = np.zeros((len(centers), c, size, size), image.dtype)
    kept = []
    for i, (cy, cx) in enumerate(centers):
        y0, x0, y1, x1 = crop_box(cy, cx, size)
        inside = y0 >= 0 and x0 >= 0 and y1 <= h and x1 <= w
        if not inside and border == "drop":
            continue
        sy0, sx0, sy1, sx1 = max(y0, 0), max(x0, 0), min(y1, h), min(x1, w)
        if sy1 <= sy0 or sx1 <= sx0:
            continue
        k = len(kept)
        patch = out[k, :, sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0]
        patch[...] = image[:, sy0:sy1, sx0:sx1]
        if mask_neighbours:
            lab = labels[sy0:sy1, sx0:sx1]
            other = (lab != 0) & (lab != cell_ids[i])
            patch[:, other] = 0
        kept.append(i)
    return out[: len(kept)], np.asarray(kept, dtype=np.int64)
