"""Per-image quality control: blur, saturation, empty fields and debris.

Metrics per image (`image_metrics`), then flags over the whole screen (`flag_images`):
- `QC_Blur`: log of the variance of the Laplacian of the DNA channel divided by its mean squared
  (scale-free focus score). An image is flagged `blur` when its robust z-score (median/MAD over
  all images, needs >= 5 images) is below `blur_z`.
- `QC_Saturation`: largest fraction, over channels, of pixels at the dtype's maximum.
- `QC_Foreground`: fraction of DNA pixels above the background (median + 6 robust sigmas);
  `empty` below `min_foreground`.
- `QC_LargestObject`: image fraction covered by the largest connected DNA object whose mean
  intensity is over 3x the median object's (bright junk, not a clump of nuclei); `debris` above
  `debris_area`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

FLAGS = ("blur", "saturated", "empty", "debris")


def image_metrics(image: np.ndarray, dna_index: int = 0) -> dict[str, float]:
    """QC metrics of one site (C, H, W)."""
    dna = image[dna_index].astype(np.float32)
    mean = float(dna.mean())
    lap = ndi.laplace(ndi.gaussian_filter(dna, 1.0))
    blur = float(np.log(lap.var() / max(mean, 1e-6) ** 2 + 1e-12))
    if image.dtype.kind in "ui":
        top = np.iinfo(image.dtype).max
        sat = float(max((ch == top).mean() for ch in image))
    else:  # float images have no fixed ceiling: count pixels clipped at the channel's maximum
        sat = float(max((ch >= ch.max()).mean() for ch in image))
    small = ndi.gaussian_filter(dna, 2.0)
    med = float(np.median(small))
    sigma = 1.4826 * float(np.median(np.abs(small - med))) + 1e-6
    fg = small > med + 6 * sigma
    fg_frac = float(fg.mean())
    largest = 0.0
    if fg.any():
        lab, n = ndi.label(fg)
        if n:
            ids = np.arange(1, n + 1)
            area = np.bincount(lab.ravel(), minlength=n + 1)[1:]
            mean = np.asarray(ndi.mean(small - med, lab, ids))
            # debris: objects far brighter than the typical object (nuclei), counted by area
            bright = mean > 3.0 * np.median(mean) if n >= 3 else np.zeros(n, bool)
            largest = float(area[bright].max() / fg.size) if bright.any() else 0.0
    return {
        "QC_Blur": blur,
        "QC_Saturation": sat,
        "QC_Foreground": fg_frac,
        "QC_LargestObject": largest,
    }


def flag_images(
    metrics: pd.DataFrame,
    *,
    blur_z: float = -3.0,
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
