"""Engineered CellProfiler-like features per cell (the classical baseline), from scikit-image.

Columns are `CP_<Compartment>_<Family>_<Feature>[_<Channel>[_<Param>]]`:
- AreaShape of Nuclei and Cells: Area, Perimeter, Eccentricity, Solidity, Extent, FormFactor
  (4 pi area / perimeter^2), MajorAxisLength, MinorAxisLength, Compactness, EulerNumber.
- Intensity per channel of Nuclei, Cytoplasm (cell minus nucleus) and Cells: Integrated, Mean,
  Std, Min, Max, Median, LowerQuartile, UpperQuartile.
- Texture (Haralick, grey-level co-occurrence in the cell, distance `glcm_distance`, averaged over
  4 directions, `glcm_levels` grey levels scaled within the cell): Contrast, Correlation,
  AngularSecondMoment, Homogeneity, Entropy, per channel.
- RadialDistribution per channel in `radial_bins` rings from the nucleus centre (0) to the cell
  edge (1), as in CellProfiler: FracAtD (fraction of the cell's intensity in the ring) and
  MeanFrac (FracAtD over the ring's fraction of the cell's area).
Input intensities are floats (after illumination correction); nothing is normalised here.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from skimage import measure
from skimage.feature import graycomatrix

SHAPE = (
    "Area",
    "Perimeter",
    "Eccentricity",
    "Solidity",
    "Extent",
    "FormFactor",
    "MajorAxisLength",
    "MinorAxisLength",
    "Compactness",
    "EulerNumber",
)
INTENSITY = (
    "IntegratedIntensity",
    "MeanIntensity",
    "StdIntensity",
    "MinIntensity",
    "MaxIntensity",
    "MedianIntensity",
    "LowerQuartileIntensity",
    "UpperQuartileIntensity",
)
TEXTURE = ("Contrast", "Correlation", "AngularSecondMoment", "Homogeneity", "Entropy")


def shape_features(mask: np.ndarray) -> dict[str, float]:
    """AreaShape of one binary object (any crop containing it)."""
    mask = mask.astype(np.uint8)
    if not mask.any():
        return {k: np.nan for k in SHAPE}
    p = measure.regionprops(mask)[0]
    area, perim = float(p.area), float(p.perimeter)
    return {
        "Area": area,
        "Perimeter": perim,
        "Eccentricity": float(p.eccentricity),
        "Solidity": float(p.solidity),
        "Extent": float(p.extent),
        "FormFactor": 4 * np.pi * area / perim**2 if perim > 0 else np.nan,
        "MajorAxisLength": float(p.axis_major_length),
        "MinorAxisLength": float(p.axis_minor_length),
        "Compactness": perim**2 / (4 * np.pi * area) if area > 0 else np.nan,
        "EulerNumber": float(p.euler_number),
    }


def intensity_features(values: np.ndarray) -> dict[str, float]:
    """Intensity statistics of the pixel values of one object in one channel."""
    if values.size == 0:
        return {k: np.nan for k in INTENSITY}
    v = values.astype(np.float64)
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return {
        "IntegratedIntensity": float(v.sum()),
        "MeanIntensity": float(v.mean()),
        "StdIntensity": float(v.std()),
        "MinIntensity": float(v.min()),
        "MaxIntensity": float(v.max()),
        "MedianIntensity": float(med),
        "LowerQuartileIntensity": float(q1),
        "UpperQuartileIntensity": float(q3),
    }


def haralick(image: np.ndarray, mask: np.ndarray, *, levels: int = 16, distance: int = 3) -> dict:
    """Haralick features of the pixels under `mask`, co-occurrences inside the mask only.

    Pixels are scaled to 1..levels between the object's min and max; outside = 0, and pairs
    touching 0 are dropped before normalising (so the background does not count).
    """
    vals = image[mask]
    if vals.size < 2:
        return {k: np.nan for k in TEXTURE}
    lo, hi = float(vals.min()), float(vals.max())
    q = np.zeros(image.shape, np.uint8)
    scale = (levels - 1) / (hi - lo) if hi > lo else 0.0
    q[mask] = 1 + np.floor((image[mask] - lo) * scale + 1e-9).astype(np.uint8).clip(0, levels - 1)
    angles = [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4]
    glcm = graycomatrix(q, [distance], angles, levels=levels + 1, symmetric=True, normed=False)
    glcm = glcm[1:, 1:, 0, :].astype(np.float64)  # (L, L, angles)
    feats = {k: [] for k in TEXTURE}
    i, j = np.mgrid[0:levels, 0:levels]
    for a in range(glcm.shape[-1]):
        p = glcm[..., a]
        total = p.sum()
        if total == 0:
            continue
        p = p / total
        mu_i, mu_j = (i * p).sum(), (j * p).sum()
        sd_i = np.sqrt(((i - mu_i) ** 2 * p).sum())
        sd_j = np.sqrt(((j - mu_j) ** 2 * p).sum())
        feats["Contrast"].append(((i - j) ** 2 * p).sum())
        corr = ((i - mu_i) * (j - mu_j) * p).sum() / (sd_i * sd_j) if sd_i * sd_j > 0 else 1.0
        feats["Correlation"].append(corr)
        feats["AngularSecondMoment"].append((p**2).sum())
        feats["Homogeneity"].append((p / (1.0 + (i - j) ** 2)).sum())
        nz = p[p > 0]
        feats["Entropy"].append(float(-(nz * np.log2(nz)).sum()))
    return {k: float(np.mean(v)) if v else np.nan for k, v in feats.items()}


def radial_distribution(
    image: np.ndarray, cell: np.ndarray, nucleus: np.ndarray, *, bins: int = 4
) -> dict[str, float]:
    """FracAtD and MeanFrac per ring, normalised distance centre (0) → cell edge (1)."""
    out = {}
    if not cell.any():
        for b in range(bins):
            out[f"FracAtD_{b + 1}of{bins}"] = np.nan
            out[f"MeanFrac_{b + 1}of{bins}"] = np.nan
        return out
    seed = nucleus & cell
    if seed.any():
        cy, cx = ndi.center_of_mass(seed)
    else:
        cy, cx = ndi.center_of_mass(cell)
    centre = np.ones(cell.shape, bool)
    centre[int(round(cy)), int(round(cx))] = False
    d_centre = ndi.distance_transform_edt(centre)
    d_edge = ndi.distance_transform_edt(cell)
    norm = d_centre / np.maximum(d_centre + d_edge, 1e-9)
    ring = np.minimum((norm * bins).astype(int), bins - 1)
    v = image.astype(np.float64)
    total = v[cell].sum()
    n = cell.sum()
    for b in range(bins):
        sel = cell & (ring == b)
        frac = v[sel].sum() / total if total > 0 else np.nan
        area_frac = sel.sum() / n
        out[f"FracAtD_{b + 1}of{bins}"] = float(frac)
        out[f"MeanFrac_{b + 1}of{bins}"] = float(frac / area_frac) if area_frac > 0 else np.nan
    return out


def cell_features(
    image: np.ndarray,
    nuclei: np.ndarray,
    cells: np.ndarray,
    channels: list[str],
    *,
    cell_ids: list[int] | np.ndarray | None = None,
    glcm_levels: int = 16,
    glcm_distance: int = 3,
    radial_bins: int = 4,
) -> pd.DataFrame:
    """One row per cell id (label shared by `nuclei` and `cells`), CP_* columns only."""
    image = image.astype(np.float32, copy=False)
    ids = np.unique(cells[cells > 0]) if cell_ids is None else np.asarray(cell_ids)
    boxes = ndi.find_objects(np.maximum(cells, nuclei))
    rows = []
    for cid in ids:
        box = boxes[cid - 1] if cid - 1 < len(boxes) else None
        if box is None:
            rows.append({})
            continue
        sl = (
            slice(max(box[0].start - 1, 0), box[0].stop + 1),
            slice(max(box[1].start - 1, 0), box[1].stop + 1),
        )
        cell = cells[sl] == cid
        nuc = nuclei[sl] == cid
        cyto = cell & ~nuc
        row: dict[str, float] = {}
        for comp, m in (("Nuclei", nuc), ("Cells", cell)):
            for k, v in shape_features(m).items():
                row[f"CP_{comp}_AreaShape_{k}"] = v
        for c, name in enumerate(channels):
            plane = image[c][sl]
            for comp, m in (("Nuclei", nuc), ("Cytoplasm", cyto), ("Cells", cell)):
                for k, v in intensity_features(plane[m]).items():
                    row[f"CP_{comp}_Intensity_{k}_{name}"] = v
            for k, v in haralick(plane, cell, levels=glcm_levels, distance=glcm_distance).items():
                row[f"CP_Cells_Texture_{k}_{name}_{glcm_distance}"] = v
            for k, v in radial_distribution(plane, cell, nuc, bins=radial_bins).items():
                row[f"CP_Cells_RadialDistribution_{k.split('_')[0]}_{name}_{k.split('_')[1]}"] = v
        rows.append(row)
    return pd.DataFrame(rows)
