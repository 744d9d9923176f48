"""Nuclei and cells: Otsu + distance-transform watershed, cells seeded by nuclei, or the user's own.

- `segment_nuclei(dna)`: Gaussian smoothing, Otsu threshold, holes filled, touching nuclei split by
  a watershed on the distance transform (seeds: its local maxima), size filters → labels (H, W).
- `segment_cells(body, nuclei)`: watershed on the (inverted, smoothed) cell-body channel seeded by
  the nuclei, inside an Otsu foreground; same labels as the nuclei. `expand_nuclei` without one.
- `labels_from_mask`, `match_cells`: user masks (they live in `data.user_masks`; re-exported).
- `object_f1(pred, ref, iou=0.5)`: object-level matching score used by tests and benchmarks.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage import filters, morphology, segmentation
from skimage.feature import peak_local_max

from celldino.data.user_masks import labels_from_mask, match_cells  # noqa: F401  (moved there)


def _relabel(labels: np.ndarray) -> np.ndarray:
    out, _, _ = segmentation.relabel_sequential(labels)
    return out.astype(np.int32)


def segment_nuclei(
    dna: np.ndarray,
    *,
    smooth_sigma: float = 2.0,
    min_area: int = 50,
    max_area: int = 20000,
    min_distance: int = 7,
    exclude_border: bool = True,
) -> np.ndarray:
    """Labels (H, W) int32 of nuclei in a DNA image; 0 = background.

    `exclude_border` drops nuclei touching the image edge (CellProfiler's default).
    """
    img = filters.gaussian(dna.astype(np.float32), sigma=smooth_sigma, preserve_range=True)
    if float(img.max()) - float(img.min()) < 1e-6:
        return np.zeros(dna.shape, np.int32)
    thr = filters.threshold_otsu(img)
    # an empty field: the Otsu step is within the pixel noise (estimated from the residual)
    resid = dna.astype(np.float32) - img
    noise = 1.4826 * float(np.median(np.abs(resid - np.median(resid))))
    if thr - float(np.median(img)) < 3.0 * noise:
        return np.zeros(dna.shape, np.int32)
    fg = ndi.binary_fill_holes(img > thr)
    fg = morphology.remove_small_objects(fg, max_size=max(1, min_area // 2))
    if not fg.any():
        return np.zeros(dna.shape, np.int32)
    dist = ndi.distance_transform_edt(fg)
    dist = filters.gaussian(dist, sigma=1.0, preserve_range=True)
    comps, _ = ndi.label(fg)
    peaks = peak_local_max(dist, min_distance=min_distance, labels=comps, exclude_border=False)
    markers = np.zeros(dna.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    # components with no peak (flat plateaus) keep one seed at their maximum
    has_seed = np.zeros(comps.max() + 1, bool)
    has_seed[comps[markers > 0]] = True
    for lab in np.flatnonzero(~has_seed[1:]) + 1:
        ys, xs = np.nonzero(comps == lab)
        j = np.argmax(dist[ys, xs])
        markers[ys[j], xs[j]] = markers.max() + 1
    labels = segmentation.watershed(-dist, markers, mask=fg)
    areas = np.bincount(labels.ravel())
    bad = (areas < min_area) | (areas > max_area)
    bad[0] = False
    labels[bad[labels]] = 0
    if exclude_border:
        labels = segmentation.clear_border(labels)
    return _relabel(labels)


def segment_cells(
    body: np.ndarray, nuclei: np.ndarray, *, smooth_sigma: float = 2.0, max_expand: int = 100
) -> np.ndarray:
    """Cells (H, W) int32 with the nucleus labels, by watershed on the cell-body channel."""
    if nuclei.max() == 0:
        return nuclei.astype(np.int32)
    img = filters.gaussian(body.astype(np.float32), sigma=smooth_sigma, preserve_range=True)
    thr = filters.threshold_otsu(img) if float(img.max()) > float(img.min()) else img.max()
    # a lenient foreground (half-way to Otsu from the background level) keeps dim cytoplasm
    bg = float(np.percentile(img, 5))
    fg = (img > bg + 0.5 * (thr - bg)) | (nuclei > 0)
    # stay within max_expand px of a nucleus
    near = ndi.distance_transform_edt(nuclei == 0) <= max_expand
    cells = segmentation.watershed(-img, nuclei, mask=fg & near)
    return cells.astype(np.int32)


def expand_nuclei(nuclei: np.ndarray, distance: int = 15) -> np.ndarray:
    """Cells as nuclei grown by `distance` px without overlap (no cell-body channel)."""
    return segmentation.expand_labels(nuclei, distance=distance).astype(np.int32)


def object_f1(pred: np.ndarray, ref: np.ndarray, iou: float = 0.5) -> dict:
    """Object-level precision, recall and F1: a match is a pair of objects with IoU >= iou.

    Objects are the distinct non-zero labels (labels may skip numbers), not `max()`.
    """
    pred_ids, pred_idx = np.unique(np.asarray(pred), return_inverse=True)
    ref_ids, ref_idx = np.unique(np.asarray(ref), return_inverse=True)
    # index 0 is background only when label 0 is present; shift so that 0 always means background
    pred_idx = pred_idx.reshape(-1) + (0 if pred_ids[0] == 0 else 1)
    ref_idx = ref_idx.reshape(-1) + (0 if ref_ids[0] == 0 else 1)
    n_pred = int(np.count_nonzero(pred_ids))
    n_ref = int(np.count_nonzero(ref_ids))
    tp = 0
    if n_pred and n_ref:
        fg = (pred_idx > 0) & (ref_idx > 0)
        inter = np.zeros((n_pred + 1, n_ref + 1), np.int64)
        np.add.at(inter, (pred_idx[fg], ref_idx[fg]), 1)
        a_pred = np.bincount(pred_idx, minlength=n_pred + 1)
        a_ref = np.bincount(ref_idx, minlength=n_ref + 1)
        union = a_pred[:, None] + a_ref[None, :] - inter
        ious = np.where(union > 0, inter / np.maximum(union, 1), 0.0)[1:, 1:]
        # greedy one-to-one matching, best IoU first (at IoU > 0.5 matches are unique anyway)
        used_p, used_r = set(), set()
        pi, ri = np.nonzero(ious >= iou)
        for k in np.argsort(-ious[pi, ri], kind="stable"):
            if pi[k] not in used_p and ri[k] not in used_r:
                used_p.add(pi[k])
                used_r.add(ri[k])
                tp += 1
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_ref if n_ref else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "tp": tp,
        "n_pred": n_pred,
        "n_ref": n_ref,
        "precision": precision,
        "recall": recall,
        "f1": f1,
    }
