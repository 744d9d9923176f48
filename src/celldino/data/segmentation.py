"""Nuclei and cells, adapted to the image's own scale the way CellProfiler's modules work.

- `estimate_nucleus_diameter(dna)`: the typical nucleus diameter (px), from the distance transform
  of a first foreground: each regional maximum (one per nucleus, touching ones included) is a
  nucleus' inscribed radius; twice their area-weighted median.
- `segment_nuclei(dna)`: adaptive by default (IdentifyPrimaryObjects-like): the background
  flattened (a smooth low-percentile surface subtracted), the diameter D estimated (or given), the
  image smoothed at D/30, thresholded by minimum cross-entropy with the bright tail clipped (robust
  to bright debris and halos) and never inside the background's own spread (sparse fields), holes
  smaller than a disc of D/4 radius filled (not the background a ring of nuclei encloses), touching
  nuclei split by a watershed on the distance transform seeded by its maxima at least D/5 apart,
  pieces joined again where the neck between them is not narrower than the smaller one
  ("shape" declumping; "shape_intensity" and "intensity" on request), objects outside 0.3 D (at least
  6 px) to 3 D (equivalent diameter) dropped. `method="fixed"` gives the 0.2 behaviour (Otsu, fixed pixel
  settings).
- `segment_cells(body, nuclei)`: CellProfiler's IdentifySecondaryObjects "Propagation" (centrosome's
  own `propagate`) on the cell-body channel, inside its foreground and within a distance tied to
  the nucleus size; same labels as the nuclei. `expand_nuclei` without a cell channel.
- `labels_from_mask`, `match_cells`: user masks (they live in `data.user_masks`; re-exported).
- `object_f1(pred, ref, iou=0.5)`: object-level matching score used by tests and benchmarks.

Measured from sparse to confluent fields (synthetic, `celldino.synth.nuclei`) and on the real sets
with truth: bench/bench_segmentation.py, numbers in docs/validation.md.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage import filters, morphology, segmentation
from skimage.feature import peak_local_max

from celldino.data.user_masks import (  # the user-mask functions moved there, re-exported
    _relabel,
    labels_from_mask,  # noqa: F401
    match_cells,  # noqa: F401
)

NUCLEI_METHODS = ("adaptive", "fixed")
DECLUMP = ("shape_intensity", "shape", "intensity")
DEFAULT_DECLUMP = "shape"
# Settings of the 0.2 segmentation (method="fixed"), kept for reproducibility.
FIXED_DEFAULTS = {"smooth_sigma": 2.0, "min_area": 50, "max_area": 20000, "min_distance": 7}
# Adaptive settings as fractions of the nucleus diameter D (CellProfiler ties its automatic
# smoothing and maxima suppression to the expected object diameter in the same way).
SMOOTH_PER_D = 1 / 30  # Gaussian sigma before thresholding
MIN_SMOOTH = 0.5  # px, the least smoothing of the image and of the distance transform
SEED_DISTANCE_PER_D = 1 / 5  # minimum distance between two nucleus seeds
SEED_SMOOTH_PER_D = 1 / 30  # smoothing of the distance transform for seeds
# intensity seeds: CellProfiler's automatic smoothing, FWHM 2.35 x (D/2) / 3.5, i.e. sigma D/7
INTENSITY_SMOOTH_PER_D = 1 / 7
MIN_DIAMETER_PER_D, MAX_DIAMETER_PER_D = 0.3, 3.0  # kept equivalent diameters
MIN_DIAMETER_PX = 6.0  # and at least 6 px: debris specks of 12-19 px² are no nuclei
BACKGROUND_FLOOR_SD = 6.0  # a threshold at least this many background SDs above it
HOLE_RADIUS_PER_D = 0.25  # holes filled unless a disc of D/4 radius fits (enclosed background)
BACKGROUND_BLOCK, BACKGROUND_WINDOW = 32, 7  # background: 10th pct of blocks, min over 7x7
LI_MAX_ITER = 200
NECK_MERGE_RATIO = 0.9  # pieces merged where the neck is this x the smaller one's radius
CLIP_PERCENTILE = 75.0  # bright tail clipped at this percentile of the first foreground
CELL_EXPAND_PER_D = 0.5  # nuclei grown by D/2 when there is no cell channel
CELL_REACH_PER_D = 2.0  # a cell reaches at most 2 D beyond its nucleus


def _threshold_li(x: np.ndarray) -> float:
    """skimage's `threshold_li` (same start, step and tolerance) with at most 200 iterations.

    On some float fields its iteration alternates between two values forever (a sparse synthetic
    field of 10 px nuclei hung it); the mean of the last two is returned there.
    """
    x = np.asarray(x, np.float64).ravel()
    lo = float(x.min())
    x = x - lo
    levels = np.unique(x)
    if levels.size < 2:
        return lo
    tol = float(np.min(np.diff(levels))) / 2.0
    t, prev = float(x.mean()), -2.0 * tol
    for _ in range(LI_MAX_ITER):
        if abs(t - prev) <= tol:
            break
        fore = x > t
        if not fore.any() or fore.all():
            break
        mean_fore, mean_back = float(x[fore].mean()), float(x[~fore].mean())
        if mean_back == 0.0:
            break
        prev, t = t, (mean_back - mean_fore) / (np.log(mean_back) - np.log(mean_fore))
    else:
        t = (t + prev) / 2.0
    return t + lo


def _mce_log_threshold(img: np.ndarray, floor: bool = True) -> float:
    """Minimum cross-entropy (Li; CellProfiler's default) threshold, robust to a bright tail.

    A first Li threshold on log intensities finds the objects without letting a few very bright
    ones (mitoses, debris, out-of-focus halos) pull it into the nuclei, the failure of a plain
    Otsu on bright, uneven fields. That one lands low on the objects' blurred edges (synthetic
    nuclei came out 1.8x too large), so the intensities above the upper quartile of the object
    pixels are clipped to it and Li on the clipped linear intensities gives the threshold.
    With `floor`, neither is taken below `_background_floor` (nuclei on sparse fields).
    """
    lo = float(img.min())
    least = _background_floor(img) if floor else -np.inf
    first = max(float(np.expm1(_threshold_li(np.log1p(img - lo))) + lo), least)
    above = img[img > first]
    if above.size == 0:
        return first
    cap = float(np.percentile(above, CLIP_PERCENTILE))
    return max(_threshold_li(np.minimum(img, cap)), least)


def _flatten_background(img: np.ndarray) -> np.ndarray:
    """img minus its background: the 10th percentile of 32 px blocks, the lowest of each 7 x 7
    blocks (224 px) around, smoothed; then shifted so that the background level is kept.

    A ramp or vignetting of the background otherwise widens its histogram, and a global threshold
    cuts dim nuclei on the bright side or takes background on the dark side. The lowest block of a
    224 px window is background wherever that window is not covered by nuclei entirely.
    """
    h, w = img.shape
    b = BACKGROUND_BLOCK
    hb, wb = -(-h // b), -(-w // b)
    pad = np.pad(img, ((0, hb * b - h), (0, wb * b - w)), mode="reflect")
    blocks = pad.reshape(hb, b, wb, b).transpose(0, 2, 1, 3).reshape(hb, wb, b * b)
    low = np.percentile(blocks, 10.0, axis=2)
    low = ndi.minimum_filter(low, size=BACKGROUND_WINDOW, mode="nearest")
    low = ndi.uniform_filter(low, size=BACKGROUND_WINDOW, mode="nearest")
    zoom = (hb * b / hb, wb * b / wb)
    bg = ndi.zoom(low, zoom, order=1, mode="nearest", grid_mode=True)[:h, :w]
    return (img - bg + float(np.median(low))).astype(np.float32)


def _background_floor(img: np.ndarray) -> float:
    """The background level plus 6 x its spread: the lowest threshold that is not in the background.

    On a sparse field (a few % of the pixels in nuclei) Li's threshold on log intensities lands
    inside the background's own histogram mode. The background is read from the lower quartile
    (right while nuclei cover less than 3/4 of the field): its spread from the 5th to the 25th
    percentile (0.97 standard deviations of a normal distribution), its level 0.67 spreads above
    the 25th percentile.
    """
    p5, p25 = np.percentile(img, [5.0, 25.0])
    spread = float(p25 - p5) / 0.97
    return float(p25) + (0.674 + BACKGROUND_FLOOR_SD) * spread


def _is_empty(img: np.ndarray, smoothed: np.ndarray, thr: float) -> bool:
    """An empty field: foreground and background differ by less than 3 x the pixel noise.

    The noise is the robust spread of the residual `img - smoothed`; the levels are the medians
    of the smoothed pixels above and below the threshold (dim nuclei far above the noise count).
    """
    resid = img - smoothed
    noise = 1.4826 * float(np.median(np.abs(resid - np.median(resid))))
    above, below = smoothed[smoothed > thr], smoothed[smoothed <= thr]
    if not above.size or not below.size:
        return True
    return float(np.median(above)) - float(np.median(below)) < 3.0 * noise


def _diameter_from_foreground(fg: np.ndarray) -> float:
    """2 x the area-weighted median radius of the nuclei seen as distance-transform maxima.

    Each nucleus is one regional maximum of the distance transform (standing at least 1 px above
    the neck to its neighbours), whose value is its inscribed radius: touching nuclei count one by
    one with their own radius (a clump's single largest radius, weighted by the clump's area, made
    a dense field of 24 px nuclei read 31-33 px). Weighting each maximum by its radius squared (the
    area it stands for) keeps specks of debris and the lobes of irregular nuclei from deflating it.
    """
    if not fg.any():
        return 0.0
    dist = ndi.distance_transform_edt(fg)
    peaks, n = ndi.label(morphology.h_maxima(dist, 1.0))
    if n == 0:
        return 0.0
    rmax = np.asarray(ndi.maximum(dist, peaks, np.arange(1, n + 1)), np.float64)
    order = np.argsort(rmax)
    cum = np.cumsum(rmax[order] ** 2)
    # the distance runs to the centre of the nearest background pixel: the edge is 0.5 px nearer
    return 2.0 * float(rmax[order][np.searchsorted(cum, cum[-1] / 2)]) - 1.0


def _fill_small_holes(fg: np.ndarray, max_radius: float) -> np.ndarray:
    """fg with its holes filled where no disc of `max_radius` fits in the hole.

    Dim nucleoli and chromatin gaps inside a nucleus are filled; the background enclosed by a
    ring of touching nuclei on a confluent field is not (filled, it became one object as large
    as the ring and swallowed the nuclei around it).
    """
    holes = ndi.binary_fill_holes(fg) & ~fg
    if not holes.any():
        return fg
    lab, n = ndi.label(holes)
    rmax = np.asarray(
        ndi.maximum(ndi.distance_transform_edt(holes), lab, np.arange(1, n + 1)), np.float64
    )
    small = np.concatenate([[False], rmax < max_radius])
    return fg | small[lab]


def _first_foreground(img: np.ndarray) -> tuple[np.ndarray, bool]:
    """(foreground, empty) at a small fixed smoothing, before the scale is known."""
    smoothed = filters.gaussian(img, sigma=1.0, preserve_range=True)
    if float(smoothed.max()) - float(smoothed.min()) < 1e-6:
        return np.zeros(img.shape, bool), True
    thr = _mce_log_threshold(smoothed)
    if _is_empty(img, smoothed, thr):
        return np.zeros(img.shape, bool), True
    fg = morphology.remove_small_objects(smoothed > thr, max_size=8)
    # holes smaller than half a nucleus are filled: the nuclei's radius read before filling
    # (holes make it lower, which only keeps more of them open)
    return _fill_small_holes(fg, 0.5 * _diameter_from_foreground(fg) / 2), False


def estimate_nucleus_diameter(dna: np.ndarray) -> float:
    """Typical nucleus diameter in pixels (0.0 for an empty field).

    From a first foreground (background flattened, the threshold below after a 1 px smoothing):
    twice the area-weighted median inscribed radius of the distance transform's regional maxima.
    """
    img = _flatten_background(np.asarray(dna, np.float32))
    fg, empty = _first_foreground(img)
    return 0.0 if empty else _diameter_from_foreground(fg)


def segment_nuclei(
    dna: np.ndarray,
    *,
    diameter: float = 0.0,
    method: str = "adaptive",
    declump: str = "",
    smooth_sigma: float = 0.0,
    min_area: int = 0,
    max_area: int = 0,
    min_distance: int = 0,
    exclude_border: bool = True,
) -> np.ndarray:
    """Labels (H, W) int32 of nuclei in a DNA image; 0 = background.

    `method="adaptive"` (default): settings follow the nucleus diameter, `diameter` px or (0)
    estimated from the image; `smooth_sigma`, `min_area`, `max_area`, `min_distance` override
    the derived values when > 0. `declump` ("" = "shape"): seeds and watershed on the distance
    transform smoothed by D/30 ("shape"), on it times the intensity above background smoothed by
    D/7 ("shape_intensity"), or on the smoothed intensity alone ("intensity"); then neighbouring
    pieces whose shared border is at least 0.9 x the smaller one's inscribed radius are merged.
    `method="fixed"`: the 0.2 segmentation (Otsu, pixel constants of `FIXED_DEFAULTS` for settings
    left at 0).
    `exclude_border` drops nuclei touching the image edge (CellProfiler's default).
    """
    if method not in NUCLEI_METHODS:
        raise ValueError(f"method={method!r}: use one of {NUCLEI_METHODS}")
    declump = declump or DEFAULT_DECLUMP
    if declump not in DECLUMP:
        raise ValueError(f"declump={declump!r}: use one of {DECLUMP}")
    img = np.asarray(dna, np.float32)
    if method == "fixed":
        return _segment_nuclei_fixed(
            img,
            smooth_sigma=smooth_sigma or FIXED_DEFAULTS["smooth_sigma"],
            min_area=min_area or FIXED_DEFAULTS["min_area"],
            max_area=max_area or FIXED_DEFAULTS["max_area"],
            min_distance=min_distance or FIXED_DEFAULTS["min_distance"],
            exclude_border=exclude_border,
        )
    empty_out = np.zeros(img.shape, np.int32)
    img = _flatten_background(img)
    # emptiness is judged at a 1 px smoothing, where the residual is pixel noise, not texture
    fg0, empty = _first_foreground(img)
    if empty:
        return empty_out
    if diameter <= 0:
        diameter = _diameter_from_foreground(fg0)
    d = float(max(diameter, 3.0))
    sigma = smooth_sigma or max(MIN_SMOOTH, d * SMOOTH_PER_D)
    a_min = min_area or max(1, int(np.pi * (max(MIN_DIAMETER_PER_D * d, MIN_DIAMETER_PX) / 2) ** 2))
    a_max = max_area or int(np.ceil(np.pi * (MAX_DIAMETER_PER_D * d / 2) ** 2))
    seed_dist = min_distance or max(1, int(round(d * SEED_DISTANCE_PER_D)))

    smoothed = filters.gaussian(img, sigma=sigma, preserve_range=True)
    if float(smoothed.max()) - float(smoothed.min()) < 1e-6:
        return empty_out
    fg = _fill_small_holes(smoothed > _mce_log_threshold(smoothed), HOLE_RADIUS_PER_D * d)
    fg = morphology.remove_small_objects(fg, max_size=max(1, a_min // 2))
    if not fg.any():
        return empty_out
    dist = ndi.distance_transform_edt(fg)
    if declump == "shape":
        surface = filters.gaussian(
            dist, sigma=max(MIN_SMOOTH, d * SEED_SMOOTH_PER_D), preserve_range=True
        )
    else:
        surface = filters.gaussian(
            img, sigma=max(1.0, d * INTENSITY_SMOOTH_PER_D), preserve_range=True
        )
        if declump == "shape_intensity":
            # distance x intensity above the background: a neck between two nuclei is found by
            # its shape or by its dimmer gap, whichever shows it (a wide neck has no distance
            # maximum on the smaller side; a textured nucleus has many intensity maxima)
            background = float(smoothed[~fg].mean()) if not fg.all() else float(smoothed.min())
            above = np.clip(surface - background, 0.0, None)
            shape = filters.gaussian(
                dist, sigma=max(MIN_SMOOTH, d * SEED_SMOOTH_PER_D), preserve_range=True
            )
            surface = shape * above
    labels = _seeded_watershed(surface, dist, fg, seed_dist)
    labels = _merge_shallow_necks(labels, dist, NECK_MERGE_RATIO)
    return _filter_sizes(labels, a_min, a_max, exclude_border)


def _seeded_watershed(
    surface: np.ndarray, dist: np.ndarray, fg: np.ndarray, min_distance: int
) -> np.ndarray:
    """Watershed of -surface inside fg, seeds at maxima of surface at least min_distance apart."""
    comps, _ = ndi.label(fg)
    peaks = peak_local_max(surface, min_distance=min_distance, labels=comps, exclude_border=False)
    markers = np.zeros(fg.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    # components with no peak (flat plateaus) keep one seed at their deepest point
    has_seed = np.zeros(comps.max() + 1, bool)
    has_seed[comps[markers > 0]] = True
    missing = np.flatnonzero(~has_seed[1:]) + 1
    if missing.size:
        at = np.asarray(ndi.maximum_position(dist, comps, missing), np.intp).reshape(-1, 2)
        markers[at[:, 0], at[:, 1]] = len(peaks) + 1 + np.arange(missing.size)
    return segmentation.watershed(-surface, markers, mask=fg)


def _merge_shallow_necks(labels: np.ndarray, dist: np.ndarray, ratio: float) -> np.ndarray:
    """Neighbouring pieces merged where the border between them is no neck.

    The neck of two pieces is the widest point of their shared border (the largest distance-
    transform value on it); they are one nucleus when it is at least `ratio` x the inscribed radius
    of the smaller piece (a lobe of an irregular nucleus, cut by a second seed), two when narrower
    (touching nuclei meet at a narrow neck). Seeds close together find small touching nuclei and
    this puts the lobes of large irregular ones back together.
    """
    if ratio <= 0 or labels.max() < 2:
        return labels
    n = int(labels.max())
    rmax = np.zeros(n + 1)
    rmax[1:] = ndi.maximum(dist, labels, np.arange(1, n + 1))
    keys, vals = [], []
    for a, b, da, db in (
        (labels[:, :-1], labels[:, 1:], dist[:, :-1], dist[:, 1:]),
        (labels[:-1, :], labels[1:, :], dist[:-1, :], dist[1:, :]),
    ):
        m = (a != b) & (a > 0) & (b > 0)
        lo, hi = np.minimum(a[m], b[m]), np.maximum(a[m], b[m])
        keys.append(lo.astype(np.int64) * (n + 1) + hi)
        vals.append(np.minimum(da[m], db[m]))
    key, val = np.concatenate(keys), np.concatenate(vals)
    if key.size == 0:
        return labels
    order = np.argsort(key, kind="stable")
    key, val = key[order], val[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    neck = np.maximum.reduceat(val, starts)
    pa, pb = key[starts] // (n + 1), key[starts] % (n + 1)
    parent = np.arange(n + 1)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b, w in zip(pa, pb, neck):
        if w >= ratio * min(rmax[a], rmax[b]):
            ra, rb = root(int(a)), root(int(b))
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    lut = np.array([root(i) for i in range(n + 1)])
    return lut[labels]


def _filter_sizes(labels: np.ndarray, a_min: int, a_max: int, exclude_border: bool) -> np.ndarray:
    areas = np.bincount(labels.ravel())
    bad = (areas < a_min) | (areas > a_max)
    bad[0] = False
    labels[bad[labels]] = 0
    if exclude_border:
        labels = segmentation.clear_border(labels)
    return _relabel(labels)


def _segment_nuclei_fixed(
    img: np.ndarray,
    *,
    smooth_sigma: float,
    min_area: int,
    max_area: int,
    min_distance: int,
    exclude_border: bool,
) -> np.ndarray:
    """The 0.2 segmentation: Otsu, distance-transform watershed, fixed pixel settings."""
    smoothed = filters.gaussian(img, sigma=smooth_sigma, preserve_range=True)
    if float(smoothed.max()) - float(smoothed.min()) < 1e-6:
        return np.zeros(img.shape, np.int32)
    thr = filters.threshold_otsu(smoothed)
    # an empty field: the Otsu step is within the pixel noise (estimated from the residual)
    resid = img - smoothed
    noise = 1.4826 * float(np.median(np.abs(resid - np.median(resid))))
    if thr - float(np.median(smoothed)) < 3.0 * noise:
        return np.zeros(img.shape, np.int32)
    fg = ndi.binary_fill_holes(smoothed > thr)
    fg = morphology.remove_small_objects(fg, max_size=max(1, min_area // 2))
    if not fg.any():
        return np.zeros(img.shape, np.int32)
    dist = ndi.distance_transform_edt(fg)
    dist = filters.gaussian(dist, sigma=1.0, preserve_range=True)
    labels = _seeded_watershed(dist, dist, fg, min_distance)
    return _filter_sizes(labels, min_area, max_area, exclude_border)


def nucleus_diameter_of(nuclei: np.ndarray) -> float:
    """Median equivalent diameter (px) of the labelled nuclei (0.0 when there are none)."""
    areas = np.bincount(np.asarray(nuclei).ravel())[1:]
    areas = areas[areas > 0]
    return float(2.0 * np.sqrt(np.median(areas) / np.pi)) if areas.size else 0.0


def segment_cells(
    body: np.ndarray,
    nuclei: np.ndarray,
    *,
    method: str = "propagation",
    regularization: float = 0.05,
    smooth_sigma: float = 0.0,
    max_expand: int = 0,
) -> np.ndarray:
    """Cells (H, W) int32 with the nucleus labels, grown from the nuclei on the cell-body channel.

    `method="propagation"` (default): CellProfiler's IdentifySecondaryObjects Propagation
    (`centrosome.propagate`, `regularization` as CellProfiler's, on the image scaled to [0, 1] by
    its 99.9th percentile) inside the channel's foreground (the nuclei's threshold method);
    `method="watershed"`: the 0.2 watershed on the inverted smoothed channel.
    Cells reach at most `max_expand` px beyond their nucleus (0 = 2 x the median nucleus
    diameter); `smooth_sigma` 0 = 1/30 of that diameter (at least 1 px).
    """
    if method not in ("propagation", "watershed"):
        raise ValueError(f"method={method!r}: use 'propagation' or 'watershed'")
    nuclei = np.asarray(nuclei).astype(np.int32)
    if nuclei.max() == 0:
        return nuclei
    d = nucleus_diameter_of(nuclei)
    sigma = smooth_sigma or max(1.0, d * SMOOTH_PER_D)
    reach = max_expand or max(1, int(round(CELL_REACH_PER_D * d)))
    img = filters.gaussian(np.asarray(body, np.float32), sigma=sigma, preserve_range=True)
    near = ndi.distance_transform_edt(nuclei == 0) <= reach
    if method == "watershed":
        thr = filters.threshold_otsu(img) if float(img.max()) > float(img.min()) else img.max()
        # a lenient foreground (half-way to Otsu from the background level) keeps dim cytoplasm
        bg = float(np.percentile(img, 5))
        fg = (img > bg + 0.5 * (thr - bg)) | (nuclei > 0)
        return segmentation.watershed(-img, nuclei, mask=fg & near).astype(np.int32)
    from centrosome.propagate import propagate

    lo, hi = float(img.min()), float(np.percentile(img, 99.9))
    scaled = np.clip((img - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    if hi - lo < 1e-6:
        fg = np.zeros(img.shape, bool)
    else:
        # no background floor: the cells cover most of a field, their dim edges are wanted
        fg = scaled > _mce_log_threshold(scaled, floor=False)
    mask = (fg | (nuclei > 0)) & near
    cells, _ = propagate(scaled.astype(np.float64), nuclei, mask, float(regularization))
    cells = np.asarray(cells, np.int32)
    cells[nuclei > 0] = nuclei[nuclei > 0]
    return _fill_cell_holes(cells)  # CellProfiler fills holes in cells too


def _fill_cell_holes(cells: np.ndarray) -> np.ndarray:
    """Holes surrounded by one cell take that cell's label."""
    holes = ndi.binary_fill_holes(cells > 0) & (cells == 0)
    if not holes.any():
        return cells
    hole_lab, n = ndi.label(holes)
    ring_lab = ndi.grey_dilation(hole_lab, size=(3, 3))
    ring = (ring_lab > 0) & (hole_lab == 0)
    lo = np.full(n + 1, np.iinfo(np.int64).max)
    hi = np.zeros(n + 1, np.int64)
    np.minimum.at(lo, ring_lab[ring], cells[ring])
    np.maximum.at(hi, ring_lab[ring], cells[ring])
    owner = np.where((lo == hi) & (hi > 0), hi, 0)
    owner[0] = 0
    out = cells.copy()
    out[holes] = owner[hole_lab[holes]]
    return out


def expand_nuclei(nuclei: np.ndarray, distance: int = 0) -> np.ndarray:
    """Cells as nuclei grown by `distance` px without overlap (0 = half the median diameter)."""
    if distance <= 0:
        distance = max(1, int(round(CELL_EXPAND_PER_D * nucleus_diameter_of(nuclei))))
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
