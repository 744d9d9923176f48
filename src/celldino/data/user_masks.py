"""The user's own masks as nuclei and cells, and outline overlays to check any segmentation.

- `labels_from_mask(mask)`: integer labels are kept (renumbered 1..n); a binary mask becomes its
  connected components.
- `cells_from_mask(mask, nuclei)`: a cell mask for the given nuclei. A *binary* cell mask
  (CellProfiler's `MaskCells` saved as a binary image, a thresholded cell channel) holds touching
  cells as one blob: it is split by a watershed seeded with the nuclei, on the distance to the
  nearest nucleus, inside the mask (each mask pixel goes to the nucleus it is closest to, as
  CellProfiler's IdentifySecondaryObjects "Distance" method does). A *label* cell mask is used as
  it is, its labels matched to the nuclei by overlap (`match_cells`). Either way cell
  k contains nucleus k; mask parts with no nucleus are dropped and a nucleus outside the mask is
  its own cell.
- `outline_overlay(dna, nuclei, cells)`: an RGB image (the DNA channel in grey, nuclei outlines
  green, cell outlines magenta) for `prepare.save_outlines`.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage import measure, segmentation


def _relabel(labels: np.ndarray) -> np.ndarray:
    out, _, _ = segmentation.relabel_sequential(labels)
    return out.astype(np.int32)


def is_binary(mask: np.ndarray) -> bool:
    """True for a mask with at most one non-zero value (bool, 0/1, 0/255, 0/65535)."""
    mask = np.asarray(mask)
    return mask.dtype == bool or len(np.unique(mask[mask != 0])) <= 1


def labels_from_mask(mask: np.ndarray) -> np.ndarray:
    """A user mask as labels: integer labels are kept, binary masks become connected components."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a label mask must be 2-D, got shape {mask.shape}")
    if is_binary(mask):
        return measure.label(mask > 0, connectivity=1).astype(np.int32)
    return _relabel(mask.astype(np.int64))


def match_cells(nuclei: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """Relabel `cells` so that cell k contains nucleus k (by overlap); unmatched cells dropped."""
    out = np.zeros_like(cells, dtype=np.int32)
    if nuclei.max() == 0 or cells.max() == 0:
        return out
    fg = (nuclei > 0) & (cells > 0)
    pairs = np.stack([nuclei[fg], cells[fg]], 1)
    uniq, counts = np.unique(pairs, axis=0, return_counts=True)
    order = np.argsort(-counts)
    used_n, used_c = set(), set()
    mapping = np.zeros(cells.max() + 1, np.int32)
    for (n, c), _ in zip(uniq[order], counts[order]):
        if n in used_n or c in used_c:
            continue
        used_n.add(n)
        used_c.add(c)
        mapping[c] = n
    out = mapping[cells]
    # nuclei without a cell get their own nucleus as the cell
    lonely = (nuclei > 0) & ~np.isin(nuclei, list(used_n))
    out[lonely] = nuclei[lonely]
    return out


def split_cells(binary: np.ndarray, nuclei: np.ndarray) -> np.ndarray:
    """Cells (H, W) int32 with the nucleus labels: a binary cell mask split between the nuclei."""
    fg = np.asarray(binary) > 0
    nuclei = np.asarray(nuclei).astype(np.int32)
    if nuclei.max(initial=0) == 0:
        return np.zeros(nuclei.shape, np.int32)
    fg |= nuclei > 0
    distance = ndi.distance_transform_edt(nuclei == 0)
    cells = segmentation.watershed(distance, markers=nuclei, mask=fg)
    return cells.astype(np.int32)


def cells_from_mask(mask: np.ndarray, nuclei: np.ndarray) -> np.ndarray:
    """Cells for `nuclei` from a user's cell mask, binary (split) or labels (matched)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a cell mask must be 2-D, got shape {mask.shape}")
    if is_binary(mask):
        return split_cells(mask, nuclei)
    return match_cells(nuclei, labels_from_mask(mask))


def outline_overlay(dna: np.ndarray, nuclei: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: DNA in grey (1st-99.8th percentile), nuclei green, cells magenta."""
    dna = np.nan_to_num(np.asarray(dna, dtype=np.float32))
    lo, hi = np.percentile(dna, (1, 99.8))
    grey = np.clip((dna - lo) / max(float(hi - lo), 1e-6), 0, 1) * 255
    rgb = np.repeat(grey[..., None], 3, axis=-1).astype(np.uint8)
    rgb[segmentation.find_boundaries(cells, mode="inner")] = (255, 0, 255)
    rgb[segmentation.find_boundaries(nuclei, mode="inner")] = (0, 255, 0)
    return rgb
