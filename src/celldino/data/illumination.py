"""Illumination correction per plate and channel, estimated from the background, checked against truth.

A field of view is recorded as `raw = S(x) * true + D`: `S` the flat field (vignetting, uneven
illumination), `D` the camera's dark offset. CellProfiler's CorrectIlluminationCalculate
averages the plate's images and smooths the average; that mean is dominated by where the cells
happen to lie (a dense field bends it) and keeps the offset `D` (it flattens the function: a
true 1.2x vignetting reads as 1.08x). This module instead uses the *background*
(CellProfiler's "Background" intensity choice), with the offset cancelled:

1. Per QC-passing image and channel, the background level in blocks of `block` pixels (a few
   object diameters, so every block holds background between the cells): the median of the
   lightly smoothed pixels that are background in every channel (within 3 noise sigmas of each
   channel's clipped block median, grown by 2 px: a cell's dim cytoplasm in one channel shows in
   another), the noise measured from the image itself. A block with too little background is
   left out (NaN); non-finite pixels (NaN, inf) are left out of every statistic.
2. The wells of a plate differ in background brightness (medium, autofluorescence, exposure):
   `bg_i(x) = D + S(x) b_i`, with one dark offset `D` per plate and channel (the camera's). With
   the image's level `L_i = D + mean(S) b_i`, each block's slope of `bg - D` on `L - D` through
   the origin is `S(x) / mean(S)`: one number per block from all its images. `D` is the offset
   whose block fits leave the least residual (a grid, then refined); it is identified by the
   levels' spread together with the field's shape. (Before issue 21 each block had its own
   intercept, which needs the levels' spread alone, a few %, and is 2-10x noisier.) Images whose
   block is an outlier (a cell cluster) are dropped from that block's fit (3 robust sigmas);
   each block is weighted by the inverse variance of its slope, the variance from its own
   images shrunk toward the plate's (8 pseudo-images).
3. Background noise is symmetric; cell signal in the "background" (fields so crowded that the
   blocks' median is dim cytoplasm) only adds. Residuals of that fit whose quantile skewness
   ((q90 + q10 - 2 q50) / (q90 - q10)) is beyond `MAX_SKEW` = 0.1 leave the channel flat.
4. A quadratic surface (CellProfiler's "Fit Polynomial" smoothing) is fitted to the slopes,
   weighted; `median`/`gaussian` smooth the block map instead. The surface's standard error
   comes from the same fit: a surface whose deviation from flat is within 3 standard errors is
   not significant and the channel is left flat (1.0): already-corrected images are not
   distorted by noise.
5. Stability: a significant surface is applied only when two halves of the plate's images
   (`MIN_HALF` = 5 or more each) give the same function: the worst pixel's |f_A / f_B - 1|, the
   median over `N_SPLITS` = 5 seeded random splits and that of the split into the images with
   the dimmer and the brighter background (a flat field does not depend on the background's
   level; cell signal in it does), must both be within `MAX_DISAGREEMENT` = 10 % (the whole
   plate's error is about half of that) and within the function's own correction (range - 1).
   Otherwise the channel is left flat.
6. Scaled so its minimum is 1 and saved as `illum/<plate>.npy` (C, H, W) float32
   (`celldino.io.prepared`); images are divided by it on read.

Every channel left flat by 3 or 5 is warned about naming the plate, the channel and the
measurement (skewness, or the halves' disagreement against the fitted range), with what to do
(more images per plate; `prepare.illum_stability_test=false` applies the fit anyway, skipping
3 and 5); the report (`prepare.json` -> `illumination_report`) records per channel its status,
`fitted_range`, `disagreement` (with `disagreement_random`, `disagreement_by_level`) or `skew`. Why: the significance test alone let noise through: on
the README tour's screen (30 cells per 128 px site, fields ~84 % covered, 14 images) plate P01's
RNA function was applied at 11.13x against a planted 1.215x.

The identification needs background levels that vary between images and enough images. A plate
with fewer than `min_images` (`prepare.illum_min_images`, default `MIN_FIT_IMAGES` = 10) QC-passing
images is not corrected (flat, warned: on NF1's five already-corrected sites a fit reads 1.13x
and 6.1x, noise). Measured against the planted vignetting (bench/bench_illumination.py,
docs/validation.md): with 10 cells per 128 px site, 16 % of channels are applied at 10 images,
56 % at 15, 86 % at 25, all at 50 (worst pixel median 1.0 %, at most 4.2 %); the worst applied
function is 8.1 % off (10 images), 9.5 % (15), 6.6 % (25). On the `tiny` preset (14-16 images)
3 of 10 (within 6.0 % RMS), on `demo` (30-32 images of 256 px) all, worst pixel 1.9 %. On the
tour's crowded fields nothing is applied up to 50 images, 1 % at 100 (AGP: its membrane signal
leaves the residuals unskewed; 29 % off, against 18 % left flat). When the levels hardly vary (relative spread below `MIN_SPREAD`), the offset
cannot be cancelled and the plain background ratio (D = 0) is used, with a warning. A plate
with sites of several sizes gets one function per size.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import ndimage as ndi
from scipy.optimize import minimize_scalar

from celldino import log
from celldino.errors import DataError

logger = log.get_logger(__name__)

METHODS = ("polynomial", "median", "gaussian")
MIN_FIT_IMAGES = 10  # default prepare.illum_min_images: fewer, no correction (warned)
MIN_SPREAD = 0.01  # relative spread of the images' background levels needed to cancel D
MAX_DISAGREEMENT = 0.1  # two halves of the images may disagree by this much at the worst pixel
N_SPLITS = 5  # random splits of the images into halves for the stability test
MIN_HALF = 5  # images in each half: a plate needs twice as many for its functions to be tested
MAX_SKEW = 0.1  # |quantile skewness| of the background model's residuals: more, cells in it
_SHRINK = 8.0  # pseudo-images pulling each block's residual variance to the plate's
_MIN_BG_FRACTION = 0.2  # a block needs this fraction of background pixels


def auto_block(shape: tuple[int, ...], nucleus_diameter: float = 0.0) -> int:
    """Block side for the background: 2.5 nucleus diameters (about a cell's width, so blocks
    between the cells hold background), at most 1/8 of the side (the quadratic fit needs 8x8
    blocks); 1/8 of the side when the diameter is unknown; at least 8 px."""
    side = min(shape[-2:])
    b = min(2.5 * nucleus_diameter, side / 8) if nucleus_diameter > 0 else side / 8
    return int(max(8, round(b)))


def _blocks(x: np.ndarray, ny: int, nx: int) -> np.ndarray:
    bh, bw = x.shape[0] // ny, x.shape[1] // nx
    return x[: ny * bh, : nx * bw].reshape(ny, bh, nx, bw).transpose(0, 2, 1, 3).reshape(ny, nx, -1)


def background_blocks(image: np.ndarray, block: int, *, union: bool = True) -> np.ndarray:
    """(C, ny, nx) background level of each block of a (C, H, W) image (NaN: too few bg pixels).

    Per channel, the clipped median of the smoothed pixels; with `union`, a second pass takes
    the median of the pixels that are background in *every* channel (a cell's dim cytoplasm in
    one channel is found by another channel that shows it brighter).
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[None]
    c_, h, w = image.shape
    ny, nx = max(1, h // block), max(1, w // block)
    out = np.full((c_, ny, nx), np.nan)
    smooth, fg = [], np.zeros((h, w), bool)
    for c, plane in enumerate(image):
        p = plane.astype(np.float32)
        finite = np.isfinite(p)
        if not finite.any():
            smooth.append(None)
            continue
        fill = float(np.median(p[finite]))
        p = np.where(finite, p, fill)
        # pixel noise from neighbour differences (robust), then that of the smoothed image
        d = np.diff(p, axis=1)[finite[:, 1:] & finite[:, :-1]]
        noise = 1.4826 * float(np.median(np.abs(d - np.median(d)))) / np.sqrt(2) if d.size else 0
        s = np.where(finite, ndi.gaussian_filter(p, 1.0), np.nan)
        blocks = _blocks(s, ny, nx)
        tol = max(3 * 0.5 * noise, 1e-6)  # 3 sigmas of the smoothed pixels (sigma 1: ~0.28-0.5x)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            med = np.nanpercentile(blocks, 10, axis=-1)
            for _ in range(5):
                keep = np.abs(blocks - med[..., None]) < tol
                med = np.nanmedian(np.where(keep, blocks, np.nan), axis=-1)
            keep = np.abs(blocks - med[..., None]) < tol
        frac = keep.sum(-1) / blocks.shape[-1]
        out[c] = np.where(frac >= _MIN_BG_FRACTION, med, np.nan)
        smooth.append(s)
        if union and np.isfinite(out[c]).any():  # this channel's foreground, on its local level
            grid = np.where(np.isfinite(out[c]), out[c], np.nanmedian(out[c]))
            level = np.repeat(np.repeat(grid, h // ny, 0), w // nx, 1)
            level = np.pad(level, ((0, h - level.shape[0]), (0, w - level.shape[1])), "edge")
            fg |= np.nan_to_num(s, nan=-np.inf) > level + tol
    if not union or c_ < 2:
        return out
    bg = ~ndi.binary_dilation(fg, iterations=2)
    if bg.mean() < _MIN_BG_FRACTION / 2:
        return out
    for c, s in enumerate(smooth):
        if s is None:
            continue
        blocks = _blocks(np.where(bg, s, np.nan), ny, nx)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            med = np.nanmedian(blocks, axis=-1)
        frac = np.isfinite(blocks).sum(-1) / blocks.shape[-1]
        out[c] = np.where(frac >= _MIN_BG_FRACTION / 2, med, np.nan)
    return out


def _design(yc: np.ndarray, xc: np.ndarray, h: int, w: int) -> np.ndarray:
    y = (yc / h - 0.5) * 2
    x = (xc / w - 0.5) * 2
    return np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], -1)


def _through_origin(g: np.ndarray, level: np.ndarray, d: float, keep: np.ndarray):
    """Per block, the slope of (g - d) on (level - d) through the origin, and the residuals."""
    x = np.where(keep, level[:, None] - d, 0.0)
    y = np.where(keep, g - d, 0.0)
    slope = (x * y).sum(0) / np.maximum((x * x).sum(0), 1e-12)
    return slope, np.where(keep, y - slope * x, np.nan), x


def _offset(g: np.ndarray, level: np.ndarray, keep: np.ndarray) -> float:
    """The dark offset D shared by every block: the one whose through-origin fits leave the least
    residual (a grid from far below the darkest level up to it, then refined). D shifts each
    block's slope in proportion to its deviation from 1, so it is identified from the images'
    level spread and the field's shape together; every block lends it its images."""
    lo, hi = float(level.min()), float(level.max())
    span = max(hi - lo, 1e-6)

    def ss(d: float) -> float:
        return float(np.nansum(_through_origin(g, level, d, keep)[1] ** 2))

    # offsets far below the levels all read as a flat field: the grid reaches 50 spans down
    grid = lo - span * np.concatenate([[0.02], np.geomspace(0.05, 50.0, 40)])
    vals = [ss(d) for d in grid]
    j = int(np.argmin(vals))
    a_, b_ = grid[min(j + 1, len(grid) - 1)], grid[max(j - 1, 0)]
    res = minimize_scalar(ss, bounds=(min(a_, b_), max(a_, b_)), method="bounded")
    return float(res.x) if res.fun <= vals[j] else float(grid[j])


def _block_slopes(g: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Per-block slope of background on the image level, its weight, and the levels' spread.

    g: (n_images, K) block backgrounds (NaN allowed). The model is g_ik = D + S_k b_i with one
    dark offset D for the plate's channel: level_i = D + mean(S) b_i, so each block's slope of
    (g - D) on (level - D) through the origin is S_k / mean(S), one number per block from all its
    images (a free intercept per block needs the level's spread alone, a few %, and is ~10x
    noisier). Returns (slope (K,), weight (K,), relative spread of the image levels).
    """
    ok = np.isfinite(g)
    with np.errstate(all="ignore"), warnings.catch_warnings():  # a block no image has: NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        bm = np.nanmedian(g, 0)
        level = np.nanmedian(g / bm, 1) * np.nanmean(bm)
    level = np.where(np.isfinite(level), level, np.nanmean(level))
    spread = float(np.std(level) / max(abs(np.mean(level)), 1e-12))
    keep = ok.copy()
    for _ in range(2):  # fit, drop 3-sigma outliers (cell clusters), refit
        d = _offset(g, level, keep)
        slope, res, x = _through_origin(g, level, d, keep)
        r = res[np.isfinite(res)]
        mad = 1.4826 * float(np.median(np.abs(r))) if r.size else 0.0
        if mad > 0:
            full = np.where(ok, g - d - slope * (level[:, None] - d), np.inf)
            keep = ok & (np.abs(full) < 3 * mad)
    d = _offset(g, level, keep)
    slope, res, x = _through_origin(g, level, d, keep)
    cnt = keep.sum(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        var = np.nansum(res**2, 0) / np.maximum(cnt - 1, 1)
        pooled = float(np.nanmedian(var[cnt >= 3])) if (cnt >= 3).any() else 1.0
    # each block's variance from its few images, shrunk to the plate's (8 pseudo-images): a
    # block whose residuals happen to be small is not given an outsized weight
    var = ((cnt - 1) * var + _SHRINK * pooled) / np.maximum(cnt - 1 + _SHRINK, 1e-12)
    sxx = (x * x).sum(0)
    weight = np.where((cnt >= 3) & (sxx > 0), sxx / np.maximum(var, 1e-12), 0.0)
    r = res[np.isfinite(res)]
    skew = 0.0
    if r.size >= 20:
        q10, q50, q90 = np.percentile(r, [10, 50, 90])
        skew = float((q90 + q10 - 2 * q50) / max(q90 - q10, 1e-12))
    return slope, weight, spread, skew


def _surface(coef: np.ndarray, ys: np.ndarray, xs: np.ndarray, h: int, w: int) -> np.ndarray:
    """The quadratic surface at pixel rows `ys` and columns `xs`, broadcast (no design matrix)."""
    y = ((ys.astype(np.float64) / h - 0.5) * 2)[:, None]
    x = ((xs.astype(np.float64) / w - 0.5) * 2)[None, :]
    c0, c1, c2, c3, c4, c5 = coef
    return c0 + c1 * x + c2 * y + c3 * x * x + c4 * x * y + c5 * y * y


def _fit_channel(
    g: np.ndarray,
    a: np.ndarray,
    shape: tuple[int, int],
    grid: tuple[int, int],
    method: str,
    step: int,
    check_skew: bool = True,
) -> dict:
    """One channel's surface from its block backgrounds g (n_images, K), at every `step`-th pixel.

    Returns a dict: 'surf' (None when there is none), 'status' (why there is none, or
    'significant'/'not significant'), 'offset_cancelled', 'blocks', and 'skew' when the
    background model's residuals are skewed beyond `MAX_SKEW` (background noise is symmetric,
    cell signal only adds: no surface; `check_skew=False` fits one anyway).
    """
    (h, w), (ny, nx) = shape, grid
    n = len(g)
    slope, weight, spread, skew = _block_slopes(g) if n >= 3 else (None, None, 0.0, 0.0)
    cancelled = bool(slope is not None and spread >= MIN_SPREAD and (weight > 0).sum() >= 6)
    if cancelled and check_skew and abs(skew) > MAX_SKEW:
        return {
            "surf": None,
            "status": "flat: background holds cell signal (skewed residuals)",
            "offset_cancelled": True,
            "blocks": int((weight > 0).sum()),
            "skew": round(skew, 3),
        }
    if not cancelled:  # plain background ratio: the offset D is assumed 0
        cnt = np.isfinite(g).sum(0)
        with warnings.catch_warnings():  # blocks no image had background in: NaN, dropped
            warnings.simplefilter("ignore", RuntimeWarning)
            slope = np.nanmedian(g, 0) if cnt.any() else np.ones(g.shape[1])
            var = np.nanvar(g - slope[None], 0) if n > 1 else np.ones(g.shape[1])
        good = np.isfinite(slope)
        var = np.where(np.isfinite(var), var, np.inf)
        weight = np.where(good & (cnt > 0), cnt / np.maximum(var, 1e-12), 0.0)
        slope = np.where(good, slope, 0.0)
    good = weight > 0
    fit = {"surf": None, "status": "too few background blocks", "offset_cancelled": cancelled}
    fit["blocks"] = int(good.sum())
    if good.sum() < 6:
        return fit
    sw = np.sqrt(weight[good])
    coef, *_ = np.linalg.lstsq(a[good] * sw[:, None], slope[good] * sw, rcond=None)
    resid = (a[good] @ coef - slope[good]) * sw
    dof = max(int(good.sum()) - 6, 1)
    scale = max(float(resid @ resid) / dof, 1.0)  # over-dispersion of the block slopes
    try:
        cov = np.linalg.inv((a[good] * weight[good][:, None]).T @ a[good]) * scale
    except np.linalg.LinAlgError:
        return fit
    ys, xs = np.arange(0, h, step), np.arange(0, w, step)
    if method == "polynomial":
        surf = _surface(coef, ys, xs, h, w)
    else:
        bmap = np.where(good, slope, a @ coef).reshape(ny, nx)
        k = max(3, min(ny, nx) // 2 | 1)
        if method == "median":
            bmap = ndi.median_filter(bmap, size=k, mode="nearest")
        else:
            bmap = ndi.gaussian_filter(bmap, sigma=k / 2.0, mode="nearest")
        surf = ndi.zoom(bmap, (h / ny, w / nx), order=1, mode="nearest")[:h, :w]
        if surf.shape != (h, w):
            surf = np.pad(surf, ((0, h - surf.shape[0]), (0, w - surf.shape[1])), "edge")
        surf = surf[::step, ::step]
    # significance: deviation of the fitted surface from flat against its standard error
    fitted = a @ coef
    dev = fitted - float(np.average(fitted[good], weights=weight[good]))
    se = np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", a, cov, a), 0))
    fit["surf"] = surf
    fit["status"] = "significant" if np.any(np.abs(dev) > 3 * se) else "not significant"
    return fit


def _half_gap(
    g: np.ndarray, halves: list, a: np.ndarray, shape: tuple, grid: tuple, method: str, step: int
) -> float:
    """Worst pixel's |f_A / f_B - 1| of two halves' surfaces, each scaled to a mean of 1; inf
    when a half has no usable surface."""
    s = [
        _fit_channel(g[idx], a, shape, grid, method, step, check_skew=False)["surf"]
        for idx in halves
    ]
    if any(x is None or not np.isfinite(x).all() or float(x.min()) <= 0 for x in s):
        return np.inf
    fa, fb = s[0] / s[0].mean(), s[1] / s[1].mean()
    return float(np.abs(fa / fb - 1).max())


def _disagreement(
    g: np.ndarray, a: np.ndarray, shape: tuple[int, int], grid: tuple[int, int], method: str
) -> tuple[float, float]:
    """How far two halves of the images disagree (on a grid of about 32 x 32 pixels, the image's
    edges included): (the median over `N_SPLITS` random splits, the split into the images with
    the dimmer and the brighter background). A flat field does not depend on the background's
    level; cell signal in the background does (it weighs more where the background is dim)."""
    n = len(g)
    step = max(1, min(shape) // 32)
    rng = np.random.default_rng(0)  # the same images give the same decision
    rand = [
        _half_gap(g, np.array_split(rng.permutation(n), 2), a, shape, grid, method, step)
        for _ in range(N_SPLITS)
    ]
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        level = np.nanmedian(g / np.nanmedian(g, 0), 1)
    order = np.argsort(np.where(np.isfinite(level), level, np.nanmedian(level)), kind="stable")
    by_level = _half_gap(g, np.array_split(order, 2), a, shape, grid, method, step)
    return float(np.median(rand)), by_level


def estimate_function(
    blocks: np.ndarray,
    shape: tuple[int, int],
    block: int,
    *,
    method: str = "polynomial",
    max_disagreement: float = MAX_DISAGREEMENT,
) -> tuple[np.ndarray, dict]:
    """Flat field (C, H, W) float32 >= 1 from block backgrounds (n_images, C, ny, nx).

    Returns (function, info) with per channel: 'range' (max of the function), 'status'
    ('applied' or why it was left flat), 'blocks' used, 'offset_cancelled' (False when the image
    levels hardly vary and D = 0 was assumed) and, for a significant surface, 'fitted_range'
    (the range the function would have) and 'disagreement' (the larger of
    'disagreement_random' and 'disagreement_by_level', see `_disagreement`). A significant
    surface is applied only when its halves disagree by at most `max_disagreement` (relative,
    worst pixel) and by no more than its own deviation from flat (range - 1); 0 turns this test
    and the skewness check off.
    """
    if method not in METHODS:
        raise ValueError(f"illumination filter '{method}' is not one of: {', '.join(METHODS)}")
    n, c_, ny, nx = blocks.shape
    h, w = shape
    bh, bw = h // ny, w // nx
    yc, xc = np.meshgrid((np.arange(ny) + 0.5) * bh, (np.arange(nx) + 0.5) * bw, indexing="ij")
    a = _design(yc.ravel(), xc.ravel(), h, w)
    out = np.ones((c_, h, w), np.float32)
    info: dict = {"channels": []}
    for c in range(c_):
        g = blocks[:, c].reshape(n, -1)
        fit = _fit_channel(g, a, (h, w), (ny, nx), method, 1, check_skew=max_disagreement > 0)
        surf = fit.pop("surf")
        ch = {"range": 1.0, **fit}
        if surf is None:
            info["channels"].append(ch)
            continue
        if fit["status"] == "not significant":
            ch["status"] = "flat: not significant (within 3 standard errors)"
        elif not (np.isfinite(surf).all() and float(surf.min()) > 0):
            ch["status"] = "flat: implausible surface (not positive everywhere)"
        else:
            f = surf / float(surf.min())
            effect = float(f.max()) - 1
            ch["fitted_range"] = round(float(f.max()), 4)
            if max_disagreement > 0:
                # halves of fewer than MIN_HALF images cannot be compared: not tested, flat
                d_rand, d_level = (
                    _disagreement(g, a, (h, w), (ny, nx), method)
                    if n >= 2 * MIN_HALF
                    else (np.inf, np.inf)
                )
                d = max(d_rand, d_level)
                ch["disagreement"] = round(d, 4) if np.isfinite(d) else None
                ch["disagreement_random"] = round(d_rand, 4) if np.isfinite(d_rand) else None
                ch["disagreement_by_level"] = round(d_level, 4) if np.isfinite(d_level) else None
                if not d <= min(max_disagreement, effect):
                    ch["status"] = "flat: unstable (two halves of the images disagree)"
                    info["channels"].append(ch)
                    continue
            out[c] = f.astype(np.float32)
            ch["range"] = ch["fitted_range"]
            ch["status"] = "applied"
        info["channels"].append(ch)
    return out, info


class IlluminationAccumulator:
    """Per-image block backgrounds of each plate, combined over the QC-passing images.

    Sites of different sizes in one plate get one function per size (named `<plate>@<H>x<W>`
    when a plate has more than one size; `sizes()` lists them so the caller can say so).
    """

    def __init__(
        self,
        block: int = 0,
        nucleus_diameter: float = 0.0,
        dna_index: int = 0,
        channels: tuple[str, ...] | list[str] = (),
    ) -> None:
        self.block = block
        self.channels = list(channels)  # names for the report and warnings ('channel <i>' if none)
        self.nucleus_diameter = nucleus_diameter  # 0: estimated from the first image of a size
        self.dna_index = dna_index
        self.blocks: dict[tuple, list[tuple[str, np.ndarray]]] = {}
        self.examples: dict[tuple, str] = {}  # (plate, shape) → first file name seen
        self.block_of: dict[tuple, int] = {}

    def add(self, plate: str, image: np.ndarray, name: str = "", key: str = "") -> None:
        img = np.asarray(image)
        key_ = (plate, img.shape)
        if key_ not in self.block_of:
            self.block_of[key_] = self.block or auto_block(img.shape, self._diameter(img))
            self.examples[key_] = name
        self.blocks.setdefault(key_, []).append(
            (key or name, background_blocks(img, self.block_of[key_]))
        )

    def _diameter(self, img: np.ndarray) -> float:
        """The nucleus diameter given, else segmentation's estimate on this image's DNA."""
        if self.nucleus_diameter > 0:
            return self.nucleus_diameter
        from celldino.data.segmentation import estimate_nucleus_diameter

        if img.ndim != 3:
            return 0.0
        try:
            dna = np.nan_to_num(img[min(self.dna_index, len(img) - 1)])
            return float(estimate_nucleus_diameter(dna))
        except (ValueError, RuntimeError):  # a field the estimate cannot read: 1/8 of the side
            return 0.0

    def sizes(self) -> dict[str, list[tuple[tuple[int, int], str]]]:
        """Plates with sites of more than one size: {plate: [((H, W), example file), ...]}."""
        out: dict[str, list] = {}
        for (plate, shape), name in self.examples.items():
            out.setdefault(plate, []).append((tuple(shape[1:]), name))
        return {p: v for p, v in out.items() if len(v) > 1}

    def functions(
        self,
        *,
        method: str = "polynomial",
        passing: set[str] | None = None,
        min_images: int = MIN_FIT_IMAGES,
        stability: bool = True,
    ) -> tuple[dict[str, np.ndarray], dict]:
        """({name: (C, H, W) function}, {name: report}) from the images in `passing` (all when
        None). The report holds n_images, block, per-channel range and status, and warnings.
        A plate with fewer than `min_images` QC-passing images is not corrected (flat)."""
        multi = self.sizes()
        out, report = {}, {}
        for (plate, shape), items in self.blocks.items():
            name = f"{plate}@{shape[1]}x{shape[2]}" if plate in multi else plate
            used = [b for k, b in items if passing is None or k in passing]
            warnings_: list[str] = []
            n = len(used)
            if n < max(min_images, 3):
                warnings_.append(
                    f"only {n} QC-passing image(s), fewer than prepare.illum_min_images="
                    f"{min_images}: too few to tell a flat field from where the cells lie; "
                    "no illumination correction for this plate"
                )
                fn = np.ones(shape, np.float32)
                flat = {"range": 1.0, "status": "flat: too few images", "blocks": 0}
                info: dict = {"channels": [dict(flat) for _ in range(shape[0])]}
            else:
                fn, info = estimate_function(
                    np.stack(used),
                    shape[1:],
                    self.block_of[(plate, shape)],
                    method=method,
                    max_disagreement=MAX_DISAGREEMENT if stability else 0.0,
                )
            for c, ch in enumerate(info["channels"]):
                ch["channel"] = self.channels[c] if c < len(self.channels) else str(c)
                if ch["status"].startswith("flat: background holds"):
                    warnings_.append(
                        f"channel {ch['channel']}: not corrected (left flat): the background "
                        "between the cells does not follow one flat field (the residuals of its "
                        f"fit are skewed, {ch['skew']:+.2f}, beyond {MAX_SKEW}: the cells' dim "
                        "signal is in it); fields this crowded do not show the illumination. "
                        "Set prepare.illum_stability_test=false to apply it anyway"
                    )
                if ch["status"].startswith("flat: unstable"):
                    d = ch.get("disagreement")
                    if n < 2 * MIN_HALF:
                        how = (
                            f"its {n} QC-passing images are too few to compare two halves of "
                            f"{MIN_HALF} or more"
                        )
                    else:

                        def pct(x: float | None) -> str:
                            return f"{100 * x:.0f} %" if x is not None else "beyond measure"

                        how = (
                            f"two halves of the {n} QC-passing images give functions that "
                            f"differ by {pct(d)} at the worst pixel (random halves: "
                            f"{pct(ch.get('disagreement_random'))}; dimmer vs brighter "
                            f"background: {pct(ch.get('disagreement_by_level'))})"
                        )
                    warnings_.append(
                        f"channel {ch['channel']}: not corrected (left flat): {how}, against "
                        "a fitted correction of "
                        f"{100 * (ch['fitted_range'] - 1):.0f} % (range "
                        f"{ch['fitted_range']:.2f}x; applied only within "
                        f"{100 * MAX_DISAGREEMENT:.0f} % and within the correction): the "
                        "estimate is noise, or the fields are too crowded to show background. "
                        "Give the plate more images (sites) to correct it, or set "
                        "prepare.illum_stability_test=false to apply it anyway"
                    )
            if any(not ch.get("offset_cancelled", True) for ch in info["channels"]):
                warnings_.append(
                    "the images' background levels hardly vary: the camera offset could not be "
                    "cancelled and the plain background ratio was used (it understates vignetting)"
                )
            for w_ in warnings_:
                logger.warning("illumination, plate %s: %s", name, w_)
            out[name] = fn
            report[name] = {
                "n_images": n,
                "n_excluded": len(items) - n,
                "block": self.block_of[(plate, shape)],
                "method": method,
                "channels": info["channels"],
                "warnings": warnings_,
            }
        return out, report


def function_for(functions: dict[str, np.ndarray], plate: str, shape: tuple) -> np.ndarray | None:
    """The illumination function of a site of `plate` whose stack has `shape` (C, H, W)."""
    fn = functions.get(f"{plate}@{shape[-2]}x{shape[-1]}")
    return fn if fn is not None else functions.get(plate)


def apply_illumination(image: np.ndarray, function: np.ndarray | None) -> np.ndarray:
    """Divide (C, H, W) by the function; integer images stay in their dtype (rounded)."""
    if function is None:
        return image
    if function.shape != image.shape:
        raise DataError(
            f"illumination function {function.shape} does not match image {image.shape}; "
            "sites of different sizes cannot share one plate function"
        )
    corrected = image.astype(np.float32) / function
    if image.dtype.kind in "ui":
        info = np.iinfo(image.dtype)
        return np.clip(np.rint(corrected), info.min, info.max).astype(image.dtype)
    return corrected.astype(image.dtype)
