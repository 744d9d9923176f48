"""Per-image quality control: blur, saturation, empty fields and debris.

Metrics per image (`image_metrics`), then flags over the whole screen (`flag_images`). The DNA
channel's background is measured locally (`illumination.background_blocks`: the clipped median of
blocks of 1/8 of the side, which holds background between the nuclei even in a dense field) and
its noise from neighbouring-pixel differences, so no statistic assumes that the median pixel is
background (in a dense field it is not).

- `QC_LargestObject` (debris): image fraction covered by the foreground object around a
  connected region of saturated DNA pixels of at least 0.5 % of the image (bright junk overflows
  the camera over a large area; a bright nucleus saturates in specks); `debris` above
  `debris_area`. Integer images only (a float image has no ceiling to overflow). Debris pixels (dilated) are left out of the
  other metrics, so a saturated or smooth blob of junk is called debris, not blur or saturation.
- `QC_Blur`: log of the Laplacian's variance over the smoothed image's variance (relative
  sharpness, scale-free), outside debris. Flagged `blur` when its robust z-score (median/MAD
  over all images, needs >= 5 images) is below `blur_z`.
- `QC_Saturation`: largest fraction, over channels, of pixels at the dtype's maximum, outside
  debris; `saturated` above `max_saturation`.
- `QC_Foreground`: fraction of DNA pixels more than 6 noise sigmas above the local background;
  `empty` below `min_foreground`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from celldino.data.illumination import background_blocks

FLAGS = ("blur", "saturated", "empty", "debris")
_DEBRIS_CORE = 0.005  # debris: one connected saturated region of at least this image fraction


def _local_background(dna: np.ndarray) -> np.ndarray:
    """(H, W) background map of a DNA plane from block medians (NaN blocks filled)."""
    h, w = dna.shape
    block = max(8, min(h, w) // 8)
    grid = background_blocks(dna[None], block, union=False)[0]  # one channel: no union pass
    ok = np.isfinite(grid)
    if not ok.any():  # every block covered by nuclei: the darkest tenth of the pixels
        return np.full(dna.shape, float(np.nanpercentile(dna, 10)), np.float32)
    if not ok.all():  # nearest valid block
        idx = ndi.distance_transform_edt(~ok, return_distances=False, return_indices=True)
        grid = grid[tuple(idx)]
    ny, nx = grid.shape
    bg = ndi.zoom(grid, (h / ny, w / nx), order=1, mode="nearest")[:h, :w]
    if bg.shape != (h, w):
        bg = np.pad(bg, ((0, h - bg.shape[0]), (0, w - bg.shape[1])), mode="edge")
    return bg.astype(np.float32)


def _noise(plane: np.ndarray) -> float:
    """Robust pixel noise sigma from horizontal neighbour differences."""
    d = np.diff(plane, axis=1).ravel()
    return 1.4826 * float(np.median(np.abs(d - np.median(d)))) / np.sqrt(2) + 1e-6


def image_metrics(image: np.ndarray, dna_index: int = 0) -> dict[str, float]:
    """QC metrics of one site (C, H, W)."""
    dna = np.nan_to_num(image[dna_index].astype(np.float32))
    small = ndi.gaussian_filter(dna, 2.0)
    bg = _local_background(dna)
    # noise of the sigma-2 smoothed image: the pixel noise / (2 sqrt(pi) sigma) for white noise
    sigma = _noise(dna) / (2 * np.sqrt(np.pi) * 2.0)
    excess = small - bg
    fg = excess > 6 * sigma
    fg_frac = float(fg.mean())
    largest = 0.0
    debris = np.zeros(dna.shape, bool)
    # debris: a large connected region of saturated DNA pixels (bright junk overflows the
    # camera; a nucleus saturates in specks, not over a large area), counted with the
    # foreground object around it
    raw = image[dna_index]
    if raw.dtype.kind in "ui" and raw.size:
        # the camera's ceiling is the image's own maximum: 12-bit data stored as uint16 clips
        # at 4095, not at the dtype's 65535 (an unclipped image has its maximum in specks)
        sat_lab, n_sat = ndi.label(raw == raw.max())
        if n_sat:
            sat_area = np.bincount(sat_lab.ravel())[1:]
            big = np.flatnonzero(sat_area >= _DEBRIS_CORE * raw.size) + 1
            if len(big):
                lab, _ = ndi.label(fg | (sat_lab > 0))
                hit = np.unique(lab[np.isin(sat_lab, big)])
                obj = np.isin(lab, hit[hit > 0])
                largest = float(obj.mean())
                # the junk's dim halo too: grown by its own equivalent radius
                radius = max(3.0, float(np.sqrt(obj.sum() / np.pi)))
                debris = ndi.distance_transform_edt(~obj) <= radius
    keep = ~debris
    s1 = ndi.gaussian_filter(dna, 1.0)
    lap = ndi.laplace(s1)
    if keep.sum() > 16:
        blur = float(np.log(lap[keep].var() / max(float(s1[keep].var()), 1e-12) + 1e-12))
    else:
        blur = float("nan")
    # pixels clipped at each channel's own maximum (12-bit data in uint16 clips at 4095; float
    # images have no fixed ceiling); an unclipped channel has its maximum in a few pixels
    sat = float(max((ch[keep] >= np.nanmax(ch)).sum() / ch.size for ch in image))
    return {
        "QC_Blur": blur,
        "QC_Saturation": sat,
        "QC_Foreground": fg_frac,
        "QC_LargestObject": largest,
    }


def flag_images(
    metrics: pd.DataFrame,
    *,
    blur_z: float = -5.0,
    max_saturation: float = 0.05,
    min_foreground: float = 0.002,
    debris_area: float = 0.005,
) -> pd.DataFrame:
    """Add QC_Flag_<kind> booleans and QC_Flags ('' or 'blur;debris'...) to a metrics table."""
    out = metrics.copy()
    blur = out["QC_Blur"].to_numpy(float)
    ok = np.isfinite(blur)
    if ok.sum() >= 5:
        med = np.median(blur[ok])
        mad = 1.4826 * np.median(np.abs(blur[ok] - med)) + 1e-6
        z = (blur - med) / mad
    else:
        z = np.zeros_like(blur)
    out["QC_BlurZ"] = z
    out["QC_Flag_blur"] = z < blur_z
    out["QC_Flag_saturated"] = out["QC_Saturation"] > max_saturation
    out["QC_Flag_empty"] = out["QC_Foreground"] < min_foreground
    out["QC_Flag_debris"] = out["QC_LargestObject"] > debris_area
    flags = out[[f"QC_Flag_{f}" for f in FLAGS]].to_numpy()
    out["QC_Flags"] = [";".join(f for f, b in zip(FLAGS, row) if b) for row in flags]
    out["QC_Pass"] = ~flags.any(axis=1)
    return out


def summary(flagged: pd.DataFrame) -> str:
    """'3 of 48 images flagged: blur 2, debris 1' (one line for the log)."""
    n_bad = int((~flagged["QC_Pass"]).sum())
    counts = {f: int(flagged[f"QC_Flag_{f}"].sum()) for f in FLAGS}
    why = ", ".join(f"{f} {n}" for f, n in counts.items() if n) or "none"
    return f"{n_bad} of {len(flagged)} images flagged by QC ({why})"
